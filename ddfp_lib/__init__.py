"""Feature-perturbation primitives for semi-supervised semantic segmentation.

The headline is Density-Descending Feature Perturbation (DDFP): a normalizing flow learns the density
of a segmenter's features online, confident features are pushed down that density, and the classifier
learns to keep its prediction for the pushed feature.
"""

from .batchnorm import DualBatchNorm2d, convert_to_dual_bn, perturbed_bn
from .density import UNKNOWN_CLASS, FlowDensityEstimator
from .hooks import perturb_output
from .losses import ConsistencyLoss, consistency_loss, pseudo_labels
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
    call_head_without_side_effects,
    density_descent_direction,
)
from .training import OnlineFlowTrainer

__version__ = "0.1.0"

__all__ = [
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
    "call_head_without_side_effects",
    "consistency_loss",
    "convert_to_dual_bn",
    "density_descent_direction",
    "perturb_output",
    "perturbed_bn",
    "pseudo_labels",
]
