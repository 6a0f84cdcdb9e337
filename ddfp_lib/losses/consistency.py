"""ConsistencyLoss: the supervision of a perturbed branch by confident pseudo-labels."""

from __future__ import annotations

import torch
from torch import nn

from ._functional import IGNORE_INDEX, NORMALIZATIONS, consistency_loss

__all__ = ["ConsistencyLoss"]


class ConsistencyLoss(nn.Module):
    """Cross-entropy towards confident pseudo-labels, averaged over not-ignored pixels.

    ``sum_p CE(logits_p, y_p) [conf_p >= threshold] [p not ignored] / #not-ignored``; with
    ``normalization="confident"`` the sum is divided by the number of counted pixels instead (the
    reference DDFP normalisation). No pixel to count gives 0, never NaN.

    Args:
        threshold: minimum teacher confidence of a counted pixel.
        ignore_index: value marking ignored pixels in an integer ``ignore_mask`` (and in hard
            labels). A bool ``ignore_mask`` is True where a pixel is ignored. A hard label outside
            ``[0, K)`` that is neither ``ignore_index`` nor on an ignored pixel raises ValueError.
        normalization: "valid" (UniMatch) or "confident" (reference DDFP).

    Shape:
        - logits: ``(B, K, H, W)``
        - target: teacher logits ``(B, K, H, W)``, or hard labels ``(B, H, W)`` long with
          ``confidence`` ``(B, H, W)``
        - ignore_mask: ``(B, H, W)``, bool (True = ignored) or integer (``ignore_index`` = ignored)
        - output: scalar

    References:
        Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
        Segmentation", CVPR 2023.

    Examples:
        >>> loss_fn = ConsistencyLoss(threshold=0.5)
        >>> teacher = torch.tensor([[[[4.0]], [[0.0]]]])
        >>> student = torch.zeros(1, 2, 1, 1)
        >>> round(loss_fn(student, teacher).item(), 4)
        0.6931
    """

    def __init__(
        self,
        threshold: float = 0.95,
        ignore_index: int = IGNORE_INDEX,
        normalization: str = "valid",
    ):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.ignore_index = ignore_index
        self.normalization = normalization

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold}, ignore_index={self.ignore_index}, "
            f"normalization={self.normalization!r}"
        )

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        confidence: torch.Tensor | None = None,
        ignore_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return consistency_loss(
            logits,
            target,
            confidence,
            ignore_mask,
            threshold=self.threshold,
            ignore_index=self.ignore_index,
            normalization=self.normalization,
        )
