"""The calling convention shared by every feature perturbation, and the two base classes.

``perturbed = perturbation(features, head=None, mask=None, generator=None)``

``features`` is a feature map ``(B, C, H, W)`` or rows ``(N, C)``; ``head`` optionally maps features to
the space a perturbation looks at (DDFP's density space, VAT's logits); ``mask`` marks the pixels of the
head output that drive the perturbation; ``generator`` makes random perturbations reproducible. The
result has the shape and dtype of ``features``. The inputs are checked once, by
:meth:`FeaturePerturbation.forward`; ``perturb`` gets them checked.

Mask rule of every perturbation that does not look at a head (dropout, noise, feature drop, random
direction; :class:`MaskRestrictedPerturbation`): ``mask`` restricts the perturbation. Pixels where it
is False come back unchanged; pixels where it is True are perturbed. A ``mask`` given at the head
output's resolution is resized to the features' resolution with nearest-neighbour sampling; the head
itself is never called.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Generator, Tensor, nn
from torch.func import functional_call

from .._checks import RowLayout, check_features, check_mask

__all__ = [
    "FeaturePerturbation",
    "Head",
    "MaskRestrictedPerturbation",
    "call_head_without_side_effects",
    "check_call",
    "mask_at_feature_resolution",
    "per_pixel_unit",
]

Head = Callable[[Tensor], Tensor]


def call_head_without_side_effects(head: Head | None, x: Tensor) -> Tensor:
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


def per_pixel_unit(g: Tensor, channel_dim: int = 1) -> Tensor:
    """``g / ||g||_2`` over ``channel_dim``, and exactly 0 where the norm is 0 (never NaN)."""
    norm = torch.linalg.vector_norm(g, dim=channel_dim, keepdim=True)
    unit = g / norm.clamp_min(torch.finfo(g.dtype).tiny)
    return torch.where(norm > 0, unit, torch.zeros_like(unit))


def check_call(
    features: Tensor, head: Head | None, mask: Tensor | None, generator: Generator | None
) -> None:
    """Raise ValueError unless the arguments follow the calling convention.

    ``features`` must be a finite floating tensor ``(B, C, H, W)`` or ``(N, C)`` (checked on CUDA
    without a host-device synchronisation), ``mask`` a bool tensor with one entry per pixel and
    ``generator`` a ``torch.Generator``. Without a head the mask must match the features' pixels;
    with one only its batch size is known here, and a perturbation that runs the head compares
    the rest with the head's output.
    """
    check_features(features, "features", ndims=(4, 2), sync_free=True)
    if mask is not None:
        check_mask(mask, RowLayout(features).row_shape, spatial=head is None)
    if generator is not None and not isinstance(generator, Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def mask_at_feature_resolution(mask: Tensor, features: Tensor) -> Tensor:
    """A checked per-pixel bool mask as a tensor that broadcasts against ``features`` over channels.

    Args:
        mask: bool per pixel, at the features' resolution or at a head output's resolution (same
            batch); resized with nearest-neighbour sampling when the spatial size differs.
        features: the features the mask applies to.

    Shape:
        - mask: ``(B, H', W')`` for features ``(B, C, H, W)``; ``(N,)`` for features ``(N, C)``
        - returns: ``(B, 1, H, W)`` or ``(N, 1)``, bool
    """
    if features.dim() == 4 and mask.shape[-2:] != features.shape[-2:]:
        resized = F.interpolate(mask[:, None].float(), size=features.shape[-2:], mode="nearest")
        return resized > 0.5
    return mask[:, None]


class FeaturePerturbation(nn.Module):
    """Base class: checks the input once (:func:`check_call`) and delegates to :meth:`perturb`.

    Subclasses implement ``perturb(features, head, mask, generator)`` and return a tensor of the
    shape and dtype of ``features``. Their repr lists the constructor's arguments that they keep
    under the same name.

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

    def forward(
        self,
        features: Tensor,
        head: Head | None = None,
        mask: Tensor | None = None,
        generator: Generator | None = None,
    ) -> Tensor:
        check_call(features, head, mask, generator)
        return self.perturb(features, head, mask, generator)

    def perturb(
        self, features: Tensor, head: Head | None, mask: Tensor | None, generator: Generator | None
    ) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        values = [(name, getattr(self, name)) for name in names if hasattr(self, name)]
        return ", ".join(f"{n}={v!r}" for n, v in values if not isinstance(v, nn.Module))


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
        self, features: Tensor, head: Head | None, mask: Tensor | None, generator: Generator | None
    ) -> Tensor:
        perturbed = self.perturb_all(features, generator)
        if mask is None:
            return perturbed
        return torch.where(mask_at_feature_resolution(mask, features), perturbed, features)

    def perturb_all(self, features: Tensor, generator: Generator | None) -> Tensor:
        raise NotImplementedError
