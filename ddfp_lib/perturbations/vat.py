"""Virtual adversarial perturbation of features (VAT, as CCT applies it to a decoder's input).

    d ~ U(-0.5, 0.5),  d <- d / ||d||,    g = d/dd sum_{masked} KL(softmax(f(x)) || softmax(f(x + xi d))),
    r = eps * g / ||g||,    perturbed = x + r

Norms are taken per sample over (C, H, W), as CCT does (rows ``(N, C)``: per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Generator, Tensor

from .._checks import autocast_off, check_mask_shape, check_positive
from .base import (
    FeaturePerturbation,
    Head,
    call_head_without_side_effects,
    check_call,
    per_pixel_unit,
)

__all__ = ["VATPerturbation", "virtual_adversarial_direction"]


def per_sample_unit(x: Tensor) -> Tensor:
    """``x / ||x||_2`` with the norm over every dimension but the first; 0 where the norm is 0."""
    return per_pixel_unit(x.flatten(1), channel_dim=1).view_as(x)


def virtual_adversarial_direction(
    features: Tensor,
    head: Head,
    xi: float = 0.1,
    mask: Tensor | None = None,
    generator: Generator | None = None,
) -> Tensor:
    """One power iteration towards the direction that changes the head's prediction most.

    The clean and the probed head calls draw the same random numbers (e.g. the same dropout masks),
    so the KL measures the effect of ``xi * d`` alone. Both run with autocast disabled: ``xi * d`` is
    far below the resolution of bf16 or fp16. In float32 the probe must still be large enough to
    change the logits: ``d`` has unit norm over a whole image, so each element is about
    ``1/sqrt(C*H*W)``. For a DeepLabV3+ fuse block and classifier on 304 x 81 x 81 features the
    float32 direction has cosine -0.02 with the float64 one at CCT's ``xi = 1e-6`` (rounding noise:
    in effect a random direction), 0.37 at 1e-3, 0.97 at 1e-2 and 0.9996 at 1e-1.

    Args:
        features: the features to perturb (no gradient is taken through them here).
        head: maps features to logits.
        xi: length of the probe step.
        mask: bool, the head-output pixels whose KL counts; None = all.
        generator: source of the random start ``d``.

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``; head output ``(B, K, H', W')`` or ``(N, K)``
        - mask: ``(B, H', W')`` or ``(N,)``
        - returns: shape of ``features``, float32, unit or zero L2 norm per sample (per row for rows)
    """
    check_call(features, head, mask, generator)
    return _adversarial_direction(features, head, check_positive(xi, "xi"), mask, generator)


def _adversarial_direction(
    features: Tensor, head: Head, xi: float, mask: Tensor | None, generator: Generator | None
) -> Tensor:
    """:func:`virtual_adversarial_direction` of checked inputs."""
    x = features.detach()
    start = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) - 0.5
    fork_devices = [] if x.device.type == "cpu" else [x.device]
    fork_type = None if x.device.type == "cpu" else x.device.type
    with torch.enable_grad(), autocast_off(x.device.type):
        probe = per_sample_unit(start).requires_grad_()
        with torch.no_grad(), torch.random.fork_rng(devices=fork_devices, device_type=fork_type):
            clean_logits = call_head_without_side_effects(head, x)
        probed_logits = call_head_without_side_effects(head, x + xi * probe.to(x.dtype))
        if probed_logits.dim() != x.dim() or probed_logits.shape[0] != x.shape[0]:
            raise ValueError(
                f"head output has shape {tuple(probed_logits.shape)}; it must be logits in the "
                f"layout of the features {tuple(x.shape)}: (B, K, H', W') or (N, K)"
            )
        dtype = torch.promote_types(probed_logits.dtype, torch.float32)
        log_p = F.log_softmax(clean_logits.to(dtype), dim=1)
        log_q = F.log_softmax(probed_logits.to(dtype), dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        if mask is not None:
            check_mask_shape(mask, tuple(kl.shape))
            kl = kl * mask.to(kl.dtype)
        (gradient,) = torch.autograd.grad(kl.sum(), probe)
    return per_sample_unit(gradient.float())


class VATPerturbation(FeaturePerturbation):
    """Virtual adversarial training on features: ``x + eps * g / ||g||``, with ``g`` the gradient of
    the KL between the head's clean prediction and its prediction at ``x + xi * d`` (one power
    iteration from a random ``d``).

    Normalisation is per sample over ``(C, H, W)``, following CCT, so ``eps`` is the L2 norm of the
    whole perturbation of one image (of one row, for ``(N, C)`` rows), not of one pixel. ``r`` is a
    constant (gradients flow to ``features`` as through the identity). The head is required and is
    called without side effects: its parameters get no ``.grad`` and its BatchNorm statistics do not
    change. ``mask`` restricts the KL to the masked pixels of the head output; an image without
    masked pixels gets ``r = 0``.

    Args:
        xi: length of the probe step. CCT's 1e-6 is below float32 rounding for image-sized samples
            (the direction is then in effect random, see :func:`virtual_adversarial_direction`), so
            the default is 0.1, where the float32 direction matches the float64 one.
        eps: L2 norm of the perturbation per sample (CCT: 2.0).

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``
        - head output: logits ``(B, K, H', W')`` or ``(N, K)``
        - mask: bool ``(B, H', W')`` or ``(N,)`` at the head output's resolution
        - output: same shape and dtype as features

    References:
        Miyato et al., "Virtual Adversarial Training: A Regularization Method for Supervised and
        Semi-Supervised Learning", TPAMI 2018. Ouali et al., "Semi-Supervised Semantic Segmentation
        with Cross-Consistency Training", CVPR 2020.

    Examples:
        >>> vat = VATPerturbation(xi=1e-3, eps=2.0)
        >>> head = torch.nn.Conv2d(8, 3, 1)
        >>> features = torch.randn(2, 8, 4, 4)
        >>> delta = vat(features, head=head) - features
        >>> [round(n, 4) for n in delta.flatten(1).norm(dim=1).tolist()]
        [2.0, 2.0]
    """

    def __init__(self, xi: float = 0.1, eps: float = 2.0):
        super().__init__()
        self.xi = check_positive(xi, "xi")
        self.eps = check_positive(eps, "eps")

    def perturb(
        self, features: Tensor, head: Head | None, mask: Tensor | None, generator: Generator | None
    ) -> Tensor:
        if head is None:
            raise ValueError(
                "VATPerturbation needs head: the callable that maps features to logits"
            )
        direction = _adversarial_direction(features, head, self.xi, mask, generator)
        return features + (self.eps * direction).to(features.dtype)
