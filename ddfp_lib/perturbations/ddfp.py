"""Density-Descending Feature Perturbation (DDFP).

    delta = eps * g / ||g||_2 (per pixel, over channels),    g = d/d(features) sum_{masked} -log p(head(features))

The perturbed features ``features + delta`` lie lower on the learned feature density; the classifier
is then trained to keep its prediction for them.

Two options shape the direction; their defaults leave it as the reference computes it:

- ``head_mode``: the head's Dropout makes the direction random (in training, two calls on the same
  input agree with a median per-pixel cosine of about 0.6-0.8 for DeepLabV3+'s fuse block), and
  BatchNorm on batch statistics couples every pixel of the batch to every other. ``"batch_stats"``
  switches Dropout off for the gradient pass; ``"running_stats"`` also makes BatchNorm use its
  running statistics, so each pixel's gradient comes from its own receptive field only.
- ``min_grad_ratio``: per-pixel normalisation lifts every nonzero gradient to the full ``eps``,
  also where it is tiny (pixels far from the mask, reached only through BatchNorm's batch
  statistics, have about 1/50 of the masked pixels' gradient norm). With a ratio ``r > 0`` only
  pixels whose gradient norm is at least ``r`` times the median over the masked pixels move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .._checks import RowLayout, check_mask, check_positive
from ..density import FlowDensityEstimator
from .base import FeaturePerturbation, Head, call_head_without_side_effects, per_pixel_unit
from .noise import mask_at_feature_resolution

__all__ = ["HEAD_MODES", "DensityDescendingPerturbation", "density_descent_direction"]

#: How the head runs in the gradient pass: as it is ("as_is"), without Dropout and with BatchNorm
#: on batch statistics ("batch_stats"), or without Dropout and with BatchNorm on running statistics
#: ("running_stats").
HEAD_MODES = ("as_is", "batch_stats", "running_stats")


def density_descent_direction(
    estimator: FlowDensityEstimator,
    features: torch.Tensor,
    head: Head | None = None,
    mask: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    head_mode: str = "as_is",
    min_grad_ratio: float = 0.0,
) -> torch.Tensor:
    """Per-pixel unit direction in which the summed NLL of the masked pixels grows fastest.

    With ``chunk_rows=None``: one batched autograd call, no host-device synchronisation. Pixels
    whose gradient is zero (e.g. outside the mask's receptive field) get a zero direction.

    With ``chunk_rows=n``: the head runs once; then only the masked rows of its output go through
    the flow and the prior, ``n`` rows at a time, each chunk differentiated on its own, and the row
    gradients go back through the head in one more autograd call. The result is the same (the
    NLL is a sum over rows, so its gradient splits by rows), the flow never holds the graph of more
    than ``n`` rows, and unmasked rows cost nothing. Counting the masked rows reads the mask on the
    host: a synchronisation on CUDA, free on CPU.

    Args:
        estimator: the density of the head's output space.
        features: the features to perturb (no gradient is taken through them here).
        head: maps features to the estimator's space; None if they already are there.
        mask: bool, the head-output pixels whose NLL counts; None = all.
        chunk_rows: rows per flow evaluation, or None for a single evaluation of all rows.
        head_mode: one of :data:`HEAD_MODES`; how the head's Dropout and BatchNorm layers run in
            the gradient pass ("as_is": as the head's own mode sets them). The head's modes are
            restored afterwards. Other modes need ``head`` to be an ``nn.Module`` (or None).
        min_grad_ratio: 0 keeps every pixel with a nonzero gradient. ``r > 0``: the direction is
            zero wherever the gradient norm is below ``r`` times the median gradient norm over the
            masked pixels of the whole batch (over all pixels without a mask; a mask at another
            resolution than the features is resized to theirs with nearest-neighbour sampling).

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``; head output ``(B, D, H', W')`` or ``(N, D)``
        - mask: ``(B, H', W')`` or ``(N,)``
        - returns: shape of ``features``, float32 (float64 for float64 features), unit or zero
          norm per pixel
    """
    _check_chunk_rows(chunk_rows)
    _check_head_mode(head_mode, head)
    _check_min_grad_ratio(min_grad_ratio)
    with torch.enable_grad(), _head_in_mode(head, head_mode):
        leaf = features.detach().requires_grad_(True)
        mapped = call_head_without_side_effects(head, leaf)
        layout = RowLayout(mapped, estimator.dim, "head output" if head is not None else "features")
        if layout.ndim != features.dim():
            raise ValueError(
                f"head output has shape {tuple(mapped.shape)}; it must keep the layout of the "
                f"features {tuple(features.shape)}"
            )
        if mask is not None:
            check_mask(mask, layout.row_shape)
        rows = layout.to_rows(mapped)
        if chunk_rows is None:
            nll = -estimator.log_prob_rows(rows)
            if mask is not None:
                nll = nll * layout.values_to_rows(mask).to(nll.dtype)
            (gradient,) = torch.autograd.grad(nll.sum(), leaf)
        else:
            row_mask = None if mask is None else layout.values_to_rows(mask)
            row_gradient = _chunked_nll_gradient(estimator, rows.detach(), row_mask, chunk_rows)
            (gradient,) = torch.autograd.grad(rows, leaf, row_gradient.to(rows.dtype))
    gradient = gradient.to(_at_least_float32(gradient.dtype))
    direction = per_pixel_unit(gradient, channel_dim=1)
    if min_grad_ratio > 0:
        direction = direction * _large_gradient(gradient, mask, min_grad_ratio)
    return direction


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def _large_gradient(
    gradient: torch.Tensor, mask: torch.Tensor | None, ratio: float
) -> torch.Tensor:
    """Per pixel (broadcasting over channels): gradient norm >= ratio x median over the mask.

    The median (the lower one for an even count, as ``torch.median``) is read from a sort of all
    pixels with the unmasked ones placed last, at an index computed on the device: nothing is read
    on the host (``torch.nanmedian`` reads its NaN count there on CUDA). Without masked pixels the
    median is infinite and no pixel moves.
    """
    norm = torch.linalg.vector_norm(gradient, dim=1, keepdim=True)
    flat = norm.flatten()
    if mask is None:
        inside = torch.ones_like(flat, dtype=torch.bool)
    else:
        inside = mask_at_feature_resolution(mask, gradient).flatten()
    ordered = torch.sort(torch.where(inside, flat, torch.full_like(flat, float("inf")))).values
    middle = (inside.sum() - 1).clamp(min=0) // 2
    median = ordered.gather(0, middle.reshape(1))
    return (norm >= ratio * median).to(gradient.dtype)


def _check_head_mode(head_mode: str, head: Head | None) -> str:
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    if head_mode != "as_is" and head is not None and not isinstance(head, nn.Module):
        raise ValueError(
            f"head_mode={head_mode!r} switches the head's Dropout and BatchNorm layers, so the "
            f"head must be an nn.Module, got {type(head).__name__}"
        )
    return head_mode


def _check_min_grad_ratio(min_grad_ratio: float) -> float:
    value = float(min_grad_ratio)
    if not 0.0 <= value < float("inf"):
        raise ValueError(f"min_grad_ratio must be a finite number >= 0, got {min_grad_ratio!r}")
    return value


@contextlib.contextmanager
def _head_in_mode(head: Head | None, head_mode: str) -> Iterator[None]:
    """Switch the head's Dropout layers off (and its BatchNorm layers to the chosen statistics)
    for the duration of the block; every layer's own mode comes back afterwards."""
    if head_mode == "as_is" or not isinstance(head, nn.Module):
        yield
        return
    wanted: dict[nn.Module, bool] = {}
    for layer in head.modules():
        if isinstance(layer, _DropoutNd):
            wanted[layer] = False
        elif isinstance(layer, _BatchNorm):
            wanted[layer] = head_mode == "batch_stats"
    previous = {layer: layer.training for layer in wanted}
    try:
        for layer, training in wanted.items():
            layer.training = training
        yield
    finally:
        for layer, training in previous.items():
            layer.training = training


def _check_chunk_rows(chunk_rows: int | None) -> int | None:
    if chunk_rows is not None and (
        isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
    ):
        raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")
    return chunk_rows


def _chunked_nll_gradient(
    estimator: FlowDensityEstimator,
    rows: torch.Tensor,
    row_mask: torch.Tensor | None,
    chunk_rows: int,
) -> torch.Tensor:
    """Gradient of the summed NLL of the ``row_mask`` rows, zero elsewhere, ``chunk_rows`` at a time."""
    gradient = torch.zeros(rows.shape, dtype=_at_least_float32(rows.dtype), device=rows.device)
    index = None if row_mask is None else torch.nonzero(row_mask).squeeze(1)
    count = rows.shape[0] if index is None else index.numel()
    for start in range(0, count, chunk_rows):
        if index is None:
            chunk = rows[start : start + chunk_rows]
        else:
            chunk_index = index[start : start + chunk_rows]
            chunk = rows.index_select(0, chunk_index)
        chunk = chunk.detach().requires_grad_(True)
        nll = -estimator.log_prob_rows(chunk).sum()
        (chunk_gradient,) = torch.autograd.grad(nll, chunk)
        if index is None:
            gradient[start : start + chunk_rows] = chunk_gradient
        else:
            gradient.index_copy_(0, chunk_index, chunk_gradient.to(gradient.dtype))
    return gradient


class DensityDescendingPerturbation(FeaturePerturbation):
    """Push features down the learned density: ``features + eps * g / ||g||_2``, with ``g`` the
    gradient of the masked pixels' summed NLL ``-log p(head(features))``.

    ``delta`` is a constant: gradients flow to ``features`` as through the identity. The head's
    parameters get no ``.grad``, its BatchNorm statistics do not change, and the estimator is not
    updated. Works under ``torch.autocast`` (the density is evaluated in the estimator's float32)
    and in float64 with a ``.double()`` estimator; ``delta`` comes back in the features' dtype.

    Args:
        estimator: the online-trained density of the head output.
        eps: per-pixel L2 norm of the perturbation.
        chunk_rows: None (default) evaluates the density of all pixels in one autograd call with no
            host-device synchronisation. An integer evaluates only the masked pixels, that many at
            a time (see :func:`density_descent_direction`): same result, less memory, and faster
            on CPU when the mask is sparse; on CUDA it reads the mask count on the host.
        head_mode: how the head runs in the gradient pass, one of :data:`HEAD_MODES`: "as_is"
            (default, the reference: Dropout active in training, so the direction is random),
            "batch_stats" (no Dropout: a deterministic direction) or "running_stats" (no Dropout,
            BatchNorm on running statistics: deterministic, and each pixel's gradient comes from
            its own receptive field only).
        min_grad_ratio: 0 (default) moves every pixel with a nonzero gradient by ``eps``. ``r > 0``
            moves only pixels whose gradient norm is at least ``r`` times the median over the
            masked pixels; the others get ``delta = 0``. No host-device synchronisation.

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``
        - mask: bool ``(B, H', W')`` or ``(N,)`` at the head output's resolution
        - output: same shape and dtype as features

    References:
        Wang et al., "Towards the Uncharted: Density-Descending Feature Perturbation for
        Semi-supervised Semantic Segmentation", CVPR 2024.

    Examples:
        >>> est = FlowDensityEstimator(dim=8, num_classes=3, hidden_dim=16, seed=0)
        >>> ddfp = DensityDescendingPerturbation(est, eps=2.0)
        >>> features = torch.randn(2, 8, 4, 4)
        >>> perturbed = ddfp(features)
        >>> delta_norm = (perturbed - features).norm(dim=1)
        >>> bool(torch.allclose(delta_norm, torch.full_like(delta_norm, 2.0), atol=1e-4))
        True
    """

    def __init__(
        self,
        estimator: FlowDensityEstimator,
        eps: float = 4.0,
        chunk_rows: int | None = None,
        head_mode: str = "as_is",
        min_grad_ratio: float = 0.0,
    ):
        super().__init__()
        if not isinstance(estimator, FlowDensityEstimator):
            raise ValueError(
                f"estimator must be a FlowDensityEstimator, got {type(estimator).__name__}"
            )
        self.estimator = estimator
        self.eps = check_positive(eps, "eps")
        self.chunk_rows = _check_chunk_rows(chunk_rows)
        self.head_mode = _check_head_mode(head_mode, None)
        self.min_grad_ratio = _check_min_grad_ratio(min_grad_ratio)

    def extra_repr(self) -> str:
        options = "" if self.chunk_rows is None else f", chunk_rows={self.chunk_rows}"
        if self.head_mode != "as_is":
            options += f", head_mode={self.head_mode!r}"
        if self.min_grad_ratio > 0:
            options += f", min_grad_ratio={self.min_grad_ratio}"
        return f"eps={self.eps}{options}"

    def perturb(
        self,
        features: torch.Tensor,
        head: Head | None,
        mask: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        direction = density_descent_direction(
            self.estimator,
            features,
            head,
            mask,
            self.chunk_rows,
            head_mode=self.head_mode,
            min_grad_ratio=self.min_grad_ratio,
        )
        delta = (self.eps * direction).to(features.dtype)
        return features + delta
