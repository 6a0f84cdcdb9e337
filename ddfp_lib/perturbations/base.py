"""The calling convention shared by every feature perturbation.

``perturbed = perturbation(features, head=None, mask=None, generator=None)``

``features`` is a feature map ``(B, C, H, W)`` or rows ``(N, C)``; ``head`` optionally maps features to
the space a perturbation looks at (DDFP's density space, VAT's logits); ``mask`` marks the pixels of the
head output that drive the perturbation; ``generator`` makes random perturbations reproducible. The
result has the shape and dtype of ``features``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from .._checks import check_finite, check_mask

__all__ = ["FeaturePerturbation", "Head", "call_head_without_side_effects", "per_pixel_unit"]

Head = Callable[[torch.Tensor], torch.Tensor]


def call_head_without_side_effects(head: Head | None, x: torch.Tensor) -> torch.Tensor:
    """Apply ``head`` to ``x`` so that gradients reach ``x`` only and no module state changes.

    For an ``nn.Module`` the call runs on detached parameters and on copies of the buffers, so its
    parameters never receive ``.grad`` and BatchNorm running statistics stay as they were; the module's
    train/eval mode is respected (BatchNorm uses batch statistics in training, as the segmenter's own
    forward does). A plain callable is called as it is. ``None`` is the identity.
    """
    if head is None:
        return x
    if isinstance(head, nn.Module):
        state = {name: p.detach() for name, p in head.named_parameters()}
        state.update({name: b.clone() for name, b in head.named_buffers()})
        return functional_call(head, state, (x,))
    if not callable(head):
        raise ValueError(
            f"head must be None, an nn.Module or a callable, got {type(head).__name__}"
        )
    return head(x)


def per_pixel_unit(g: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """``g / ||g||_2`` over ``channel_dim``, and exactly 0 where the norm is 0 (never NaN)."""
    norm = torch.linalg.vector_norm(g, dim=channel_dim, keepdim=True)
    unit = g / norm.clamp_min(torch.finfo(g.dtype).tiny)
    return torch.where(norm > 0, unit, torch.zeros_like(unit))


class FeaturePerturbation(nn.Module):
    """Base class: checks the input and delegates to :meth:`perturb`.

    Subclasses implement ``perturb(features, head, mask, generator)`` and return a tensor of the
    shape and dtype of ``features``.

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``
        - mask: bool, ``(B, H', W')`` or ``(N,)`` at the head output's resolution
        - output: same as features

    References:
        Ouali et al., "Semi-Supervised Semantic Segmentation with Cross-Consistency Training",
        CVPR 2020. Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
        Segmentation", CVPR 2023.

    Examples:
        >>> class Doubling(FeaturePerturbation):
        ...     def perturb(self, features, head, mask, generator):
        ...         return 2.0 * features
        >>> Doubling()(torch.ones(1, 3)).tolist()
        [[2.0, 2.0, 2.0]]
    """

    #: whether ``perturb`` needs the features to be finite (checked without host sync on CUDA).
    requires_finite: bool = True

    def forward(
        self,
        features: torch.Tensor,
        head: Head | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        self.check_features(features)
        if mask is not None and head is None:
            check_mask(mask, self.pixel_shape(features))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return self.perturb(features, head, mask, generator)

    def perturb(
        self,
        features: torch.Tensor,
        head: Head | None,
        mask: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def check_features(self, features: torch.Tensor) -> None:
        """Raise ValueError unless ``features`` is a finite floating tensor ``(B, C, H, W)`` or ``(N, C)``."""
        if not isinstance(features, torch.Tensor):
            raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() not in (2, 4):
            raise ValueError(
                f"features must have shape (B, C, H, W) or (N, C), got {tuple(features.shape)}"
            )
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        if self.requires_finite:
            check_finite(features, "features", sync_free=True)

    @staticmethod
    def pixel_shape(x: torch.Tensor) -> tuple[int, ...]:
        """Shape of one value per pixel: ``(B, H, W)`` for maps, ``(N,)`` for rows."""
        return (x.shape[0], *x.shape[2:]) if x.dim() == 4 else (x.shape[0],)
