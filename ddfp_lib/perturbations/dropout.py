"""Channel dropout of features, UniMatch's feature perturbation ("FP").

perturbed = x * b / (1 - p),    b ~ Bernoulli(1 - p) per (image, channel), or per element for rows
"""

from __future__ import annotations

import torch
from torch import Generator, Tensor

from .base import MaskRestrictedPerturbation

__all__ = ["DropoutPerturbation"]


class DropoutPerturbation(MaskRestrictedPerturbation):
    """Drop whole channels with probability ``p`` and rescale the kept ones by ``1 / (1 - p)``.

    For maps this is ``nn.Dropout2d(p)``: one keep decision per image and channel. For rows
    ``(N, C)`` every element is dropped on its own (``nn.Dropout``). Unlike ``nn.Dropout2d`` it is
    active in eval mode too, as UniMatch applies it to a model-level perturbed branch. ``head`` is
    accepted and not used; ``mask`` restricts the perturbation (pixels where it is False are returned
    unchanged, neither dropped nor rescaled).

    Args:
        p: drop probability in ``[0, 1)`` (UniMatch: 0.5).

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``
        - mask: bool ``(B, H', W')`` or ``(N,)``
        - output: same shape and dtype as features

    References:
        Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
        Segmentation", CVPR 2023.

    Examples:
        >>> dropout = DropoutPerturbation(p=0.5).eval()
        >>> out = dropout(torch.ones(1, 6, 2, 2), generator=torch.Generator().manual_seed(0))
        >>> sorted(set(out.flatten().tolist()))
        [0.0, 2.0]
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = p

    def perturb_all(self, features: Tensor, generator: Generator | None) -> Tensor:
        keep_shape = features.shape if features.dim() == 2 else features.shape[:2] + (1, 1)
        uniform = torch.rand(keep_shape, generator=generator, device=features.device)
        scale = (uniform >= self.p).to(features.dtype) / (1.0 - self.p)
        return features * scale
