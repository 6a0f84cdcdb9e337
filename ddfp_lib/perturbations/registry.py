"""Build a feature perturbation from its name, e.g. from a command-line flag.

build_perturbation("ddfp", estimator=estimator, eps=4.0)
"""

from __future__ import annotations

from typing import Any

from .base import FeaturePerturbation
from .ddfp import DensityDescendingPerturbation
from .dropout import DropoutPerturbation
from .feature_drop import FeatureDropPerturbation
from .noise import UniformNoisePerturbation
from .random_direction import RandomDirectionPerturbation
from .vat import VATPerturbation

__all__ = ["available_perturbations", "build_perturbation"]

_PERTURBATIONS: dict[str, type[FeaturePerturbation]] = {
    "ddfp": DensityDescendingPerturbation,
    "dropout": DropoutPerturbation,
    "feature_drop": FeatureDropPerturbation,
    "noise": UniformNoisePerturbation,
    "random_direction": RandomDirectionPerturbation,
    "vat": VATPerturbation,
}


def available_perturbations() -> tuple[str, ...]:
    """The names :func:`build_perturbation` accepts, sorted."""
    return tuple(sorted(_PERTURBATIONS))


def build_perturbation(name: str, **kwargs: Any) -> FeaturePerturbation:
    """Construct the perturbation called ``name`` with the keyword arguments of its class.

    Args:
        name: one of :func:`available_perturbations` (case and ``-`` / ``_`` do not matter).
        **kwargs: passed to the class, e.g. ``estimator=`` and ``eps=`` for ``"ddfp"``.

    Raises:
        ValueError: an unknown name (the message lists the choices) or an argument the class
            does not take.

    Examples:
        >>> build_perturbation("dropout", p=0.5)
        DropoutPerturbation(p=0.5)
        >>> available_perturbations()
        ('ddfp', 'dropout', 'feature_drop', 'noise', 'random_direction', 'vat')
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in _PERTURBATIONS:
        raise ValueError(
            f"unknown perturbation {name!r}; choose one of {', '.join(available_perturbations())}"
        )
    cls = _PERTURBATIONS[key]
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"perturbation {key!r} ({cls.__name__}): {error}") from error
