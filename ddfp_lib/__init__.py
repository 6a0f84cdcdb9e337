"""Feature-perturbation primitives for semi-supervised semantic segmentation.

The headline is Density-Descending Feature Perturbation (DDFP): a normalizing flow learns the density
of a segmenter's features online, confident features are pushed down that density, and the classifier
learns to keep its prediction for the pushed feature.
"""

from .density import UNKNOWN_CLASS, FlowDensityEstimator
from .losses import ConsistencyLoss, consistency_loss, pseudo_labels
from .perturbations import (
    DensityDescendingPerturbation,
    FeaturePerturbation,
    call_head_without_side_effects,
    density_descent_direction,
)
from .training import OnlineFlowTrainer

__version__ = "0.1.0"

__all__ = [
    "UNKNOWN_CLASS",
    "ConsistencyLoss",
    "DensityDescendingPerturbation",
    "FeaturePerturbation",
    "FlowDensityEstimator",
    "OnlineFlowTrainer",
    "__version__",
    "call_head_without_side_effects",
    "consistency_loss",
    "density_descent_direction",
    "pseudo_labels",
]
