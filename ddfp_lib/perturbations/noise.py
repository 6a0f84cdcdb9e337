"""Uniform multiplicative feature noise (CCT), and the mask rule shared by the random perturbations.

    perturbed = x + x * n,    n ~ U(-r, r),  one draw of shape ``x.shape[1:]`` shared over the batch

Mask rule of every perturbation that does not look at a head (dropout, noise, feature drop, random
direction): ``mask`` restricts the perturbation. Pixels where it is False come back unchanged; pixels
where it is True are perturbed. A ``mask`` given at the head output's resolution is resized to the
features' resolution with nearest-neighbour sampling; the head itself is never called.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_mask, check_positive
from .base import FeaturePerturbation, Head

__all__ = ["MaskRestrictedPerturbation", "UniformNoisePerturbation", "mask_at_feature_resolution"]


def mask_at_feature_resolution(mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A per-pixel bool mask as a tensor that broadcasts against ``features`` over channels.

    Args:
        mask: bool per pixel, at the features' resolution or at a head output's resolution (same
            batch); resized with nearest-neighbour sampling when the spatial size differs.
        features: the features the mask applies to.

    Shape:
        - mask: ``(B, H', W')`` for features ``(B, C, H, W)``; ``(N,)`` for features ``(N, C)``
        - returns: ``(B, 1, H, W)`` or ``(N, 1)``, bool
    """
    if features.dim() == 2:
        check_mask(mask, (features.shape[0],))
        return mask[:, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 3 or mask.shape[0] != features.shape[0]:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"mask must be (B, H', W') with B={features.shape[0]} for features "
            f"{tuple(features.shape)}, got {shape}"
        )
    check_mask(mask, tuple(mask.shape))
    if mask.shape[-2:] != features.shape[-2:]:
        resized = F.interpolate(mask[:, None].float(), size=features.shape[-2:], mode="nearest")
        return resized > 0.5
    return mask[:, None]


class MaskRestrictedPerturbation(FeaturePerturbation):
    """Base of the perturbations that ignore ``head``: ``where(mask, perturb_all(x), x)``.

    Subclasses implement :meth:`perturb_all`, which perturbs every pixel.

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``
        - mask: bool ``(B, H', W')`` or ``(N,)``, resized to the features' resolution
        - output: same shape and dtype as features

    References:
        Ouali et al., "Semi-Supervised Semantic Segmentation with Cross-Consistency Training",
        CVPR 2020.

    Examples:
        >>> class AddOne(MaskRestrictedPerturbation):
        ...     def perturb_all(self, features, generator):
        ...         return features + 1.0
        >>> AddOne()(torch.zeros(3, 2), mask=torch.tensor([True, False, True]))[:, 0].tolist()
        [1.0, 0.0, 1.0]
    """

    def perturb(
        self,
        features: torch.Tensor,
        head: Head | None,
        mask: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        perturbed = self.perturb_all(features, generator)
        if mask is None:
            return perturbed
        return torch.where(mask_at_feature_resolution(mask, features), perturbed, features)

    def perturb_all(
        self, features: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError


class UniformNoisePerturbation(MaskRestrictedPerturbation):
    """CCT's feature noise: ``x + x * n`` with ``n ~ U(-r, r)``.

    One noise sample of shape ``features.shape[1:]`` (``(C, H, W)``, or ``(C,)`` for rows) is drawn
    per call and shared by every image of the batch. Gradients flow to ``features`` as through the
    multiplication by ``1 + n``. ``head`` is accepted and not used; ``mask`` restricts the
    perturbation (pixels where it is False are returned unchanged).

    Args:
        r: half-width of the uniform noise (CCT: 0.3).

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``
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

    def extra_repr(self) -> str:
        return f"r={self.r}"

    def perturb_all(
        self, features: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        uniform = torch.rand(
            features.shape[1:], generator=generator, device=features.device, dtype=torch.float32
        )
        noise = ((2.0 * uniform - 1.0) * self.r).to(features.dtype)
        return features + features * noise
