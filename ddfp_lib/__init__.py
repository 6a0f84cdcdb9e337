"""Feature-perturbation primitives for semi-supervised semantic segmentation.

The headline is Density-Descending Feature Perturbation (DDFP): a normalizing flow learns the density
of a segmenter's features online, confident features are pushed down that density, and the classifier
learns to keep its prediction for the pushed feature.

The names below are what a training loop calls. The functional forms of the perturbations and the
base classes for new ones live in :mod:`ddfp_lib.perturbations`, the flow's building blocks in
:mod:`ddfp_lib.flows` and :mod:`ddfp_lib.distributions`.
"""

from .batchnorm import DualBatchNorm2d, convert_to_dual_bn, perturbed_bn
from .density import UNKNOWN_CLASS, FlowDensityEstimator
from .hooks import perturb_output
from .losses import IGNORE_INDEX, ConsistencyLoss, consistency_loss, pseudo_labels
from .perturbations import (
    DensityDescendingPerturbation,
    DropoutPerturbation,
    FeatureDropPerturbation,
    FeaturePerturbation,
    RandomDirectionPerturbation,
    UniformNoisePerturbation,
    VATPerturbation,
    available_perturbations,
    build_perturbation,
)
from .training import OnlineFlowTrainer

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "UNKNOWN_CLASS",
    "ConsistencyLoss",
    "DensityDescendingPerturbation",
    "DropoutPerturbation",
    "DualBatchNorm2d",
    "FeatureDropPerturbation",
    "FeaturePerturbation",
    "FlowDensityEstimator",
    "OnlineFlowTrainer",
    "RandomDirectionPerturbation",
    "UniformNoisePerturbation",
    "VATPerturbation",
    "__version__",
    "available_perturbations",
    "build_perturbation",
    "consistency_loss",
    "convert_to_dual_bn",
    "perturb_output",
    "perturbed_bn",
    "pseudo_labels",
]
