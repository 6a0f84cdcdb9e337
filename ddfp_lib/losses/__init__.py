"""Losses for perturbed branches."""

from ._functional import IGNORE_INDEX, consistency_loss, pseudo_labels
from .consistency import ConsistencyLoss

__all__ = ["IGNORE_INDEX", "ConsistencyLoss", "consistency_loss", "pseudo_labels"]
