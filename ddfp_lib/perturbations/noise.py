"""Uniform multiplicative feature noise (CCT).

perturbed = x + x * n,    n ~ U(-r, r),  one draw of shape ``x.shape[1:]`` shared over the batch
"""

from __future__ import annotations

import torch
from torch import Generator, Tensor

from .._checks import check_positive
from .base import MaskRestrictedPerturbation

__all__ = ["UniformNoisePerturbation"]


class UniformNoisePerturbation(MaskRestrictedPerturbation):
    """CCT's feature noise: ``x + x * n`` with ``n ~ U(-r, r)``.

    One noise sample of shape ``features.shape[1:]`` (``(C, H, W)``, or ``(C,)`` for rows) is drawn
    per call and shared by every image of the batch. Gradients flow to ``features`` as through the
    multiplication by ``1 + n``. ``head`` is accepted and not used; ``mask`` restricts the
    perturbation (pixels where it is False are returned unchanged).

    Args:
        r: half-width of the uniform noise (CCT: 0.3).

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``; the noise ``n``: ``(C, H, W)`` or ``(C,)``
        - mask: bool ``(B, H', W')`` or ``(N,)``
        - output: same shape and dtype as features

    References:
        Ouali et al., "Semi-Supervised Semantic Segmentation with Cross-Consistency Training",
        CVPR 2020.

    Examples:
        >>> noise = UniformNoisePerturbation(r=0.3)
        >>> features = torch.ones(2, 4, 3, 3)
        >>> out = noise(features, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.equal(out[0], out[1])), bool(((out - 1).abs() <= 0.3).all())
        (True, True)
    """

    def __init__(self, r: float = 0.3):
        super().__init__()
        self.r = check_positive(r, "r")

    def perturb_all(self, features: Tensor, generator: Generator | None) -> Tensor:
        uniform = torch.rand(
            features.shape[1:], generator=generator, device=features.device, dtype=torch.float32
        )
        noise = ((2.0 * uniform - 1.0) * self.r).to(features.dtype)
        return features + features * noise
