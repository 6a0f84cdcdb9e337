"""Attention-based feature drop (CCT): zero the most activated pixels of every image.

A = mean_c x,    tau = max(A) * u,  u ~ U(0.7, 0.9) per image,    perturbed = x * [A < tau]
"""

from __future__ import annotations

import torch
from torch import Generator, Tensor

from .base import MaskRestrictedPerturbation

__all__ = ["FeatureDropPerturbation"]


class FeatureDropPerturbation(MaskRestrictedPerturbation):
    """CCT's FeatureDrop: keep a pixel only if its channel mean is below a random fraction of the
    image's largest channel mean.

    ``A`` is the channel-mean map; each image draws its own ``u ~ U(low, high)`` and keeps the pixels
    with ``A < max(A) * u``, zeroing all channels of the others (no rescaling). Rows ``(N, C)`` are
    treated as the pixels of one image (one maximum, one ``u``). Gradients flow to ``features``
    through the kept pixels. ``head`` is accepted and not used; ``mask`` restricts the perturbation
    (pixels where it is False are returned unchanged, never dropped).

    Args:
        threshold_range: ``(low, high)`` of the uniform fraction ``u`` (CCT: (0.7, 0.9)).

    Shape:
        - features: ``(B, C, H, W)``, or ``(N, C)`` rows taken as the pixels of one image
        - mask: bool ``(B, H', W')`` or ``(N,)``
        - output: same shape and dtype as features, dropped pixels zero in every channel

    References:
        Ouali et al., "Semi-Supervised Semantic Segmentation with Cross-Consistency Training",
        CVPR 2020.

    Examples:
        >>> drop = FeatureDropPerturbation()
        >>> features = torch.tensor([0.25, 0.5, 1.0]).expand(1, 2, 1, 3)
        >>> drop(features)[0, 0, 0].tolist()
        [0.25, 0.5, 0.0]
    """

    def __init__(self, threshold_range: tuple[float, float] = (0.7, 0.9)):
        super().__init__()
        low, high = (float(v) for v in threshold_range)
        if not 0.0 <= low <= high:
            raise ValueError(f"threshold_range must satisfy 0 <= low <= high, got ({low}, {high})")
        self.threshold_range = (low, high)

    def perturb_all(self, features: Tensor, generator: Generator | None) -> Tensor:
        low, high = self.threshold_range
        attention = features.detach().float().mean(dim=1, keepdim=True)
        if features.dim() == 2:
            peak = attention.max().reshape(1, 1)
        else:
            peak = attention.amax(dim=(2, 3), keepdim=True)
        fraction = low + (high - low) * torch.rand(
            peak.shape, generator=generator, device=features.device
        )
        keep = (attention < peak * fraction).to(features.dtype)
        return features * keep
