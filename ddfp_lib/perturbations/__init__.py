"""Feature perturbations with one calling convention: ``p(features, head=None, mask=None)``."""

from .base import FeaturePerturbation, MaskRestrictedPerturbation, call_head_without_side_effects
from .ddfp import DensityDescendingPerturbation, density_descent_direction
from .dropout import DropoutPerturbation
from .feature_drop import FeatureDropPerturbation
from .noise import UniformNoisePerturbation
from .random_direction import RandomDirectionPerturbation
from .registry import available_perturbations, build_perturbation
from .vat import VATPerturbation, virtual_adversarial_direction

__all__ = [
    "DensityDescendingPerturbation",
    "DropoutPerturbation",
    "FeatureDropPerturbation",
    "FeaturePerturbation",
    "MaskRestrictedPerturbation",
    "RandomDirectionPerturbation",
    "UniformNoisePerturbation",
    "VATPerturbation",
    "available_perturbations",
    "build_perturbation",
    "call_head_without_side_effects",
    "density_descent_direction",
    "virtual_adversarial_direction",
]
