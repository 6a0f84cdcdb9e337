"""Random-direction perturbation: DDFP's step size with a direction that ignores the density.

perturbed = x + eps * u / ||u||_2 (per pixel, over channels),    u ~ N(0, I)
"""

from __future__ import annotations

import torch
from torch import Generator, Tensor

from .._checks import check_positive
from .base import MaskRestrictedPerturbation, per_pixel_unit

__all__ = ["RandomDirectionPerturbation"]


class RandomDirectionPerturbation(MaskRestrictedPerturbation):
    """Move every pixel by ``eps`` in a direction drawn uniformly from the unit sphere.

    The control experiment for :class:`DensityDescendingPerturbation`: same per-pixel L2 norm, but
    no density. Normalising a standard Gaussian gives the uniform direction. ``delta`` is a constant
    (gradients flow to ``features`` as through the identity). ``head`` is accepted and not used;
    ``mask`` restricts the perturbation: pixels where it is False get ``delta = 0``, so a masked call
    has the support of a masked DDFP call (the mask is resized to the features' resolution when it is
    given at a head output's).

    Args:
        eps: per-pixel L2 norm of the perturbation (DDFP's default 4.0).

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``
        - mask: bool ``(B, H', W')`` or ``(N,)``
        - output: same shape and dtype as features

    References:
        Wang et al., "Towards the Uncharted: Density-Descending Feature Perturbation for
        Semi-supervised Semantic Segmentation", CVPR 2024 (the random-perturbation ablation).

    Examples:
        >>> random_direction = RandomDirectionPerturbation(eps=4.0)
        >>> features = torch.randn(2, 8, 3, 3)
        >>> delta = random_direction(features) - features
        >>> bool(torch.allclose(delta.norm(dim=1), torch.full((2, 3, 3), 4.0), atol=1e-4))
        True
    """

    def __init__(self, eps: float = 4.0):
        super().__init__()
        self.eps = check_positive(eps, "eps")

    def perturb_all(self, features: Tensor, generator: Generator | None) -> Tensor:
        gaussian = torch.randn(
            features.shape, generator=generator, device=features.device, dtype=torch.float32
        )
        delta = self.eps * per_pixel_unit(gaussian, channel_dim=1)
        return features + delta.to(features.dtype)
