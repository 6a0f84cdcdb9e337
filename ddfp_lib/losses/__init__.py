"""Losses for perturbed branches."""

from ._functional import consistency_loss, pseudo_labels
from .consistency import ConsistencyLoss

__all__ = ["ConsistencyLoss", "consistency_loss", "pseudo_labels"]
