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

A third, ``chunk_rows``, only sets how the density's gradient is computed (the result is the same):
which rows go through the flow, how many at a time, and whether the mask is read on the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Generator, Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .._checks import RowLayout, check_mask_shape, check_positive, is_tracing
from ..density import FlowDensityEstimator, check_estimator
from .base import (
    FeaturePerturbation,
    Head,
    call_head_without_side_effects,
    check_call,
    mask_at_feature_resolution,
    per_pixel_unit,
)

__all__ = [
    "AUTO_CHUNK_ROWS",
    "HEAD_MODES",
    "DensityDescendingPerturbation",
    "density_descent_direction",
]

#: Rows per flow evaluation of ``chunk_rows="auto"``: enough rows that the per-chunk overhead is
#: small, few enough to bound the flow's memory (on the CPU, 131k rows took 4.2 s in chunks of
#: 16,384 against 8.7 s in one evaluation).
AUTO_CHUNK_ROWS = 16384

#: How the head runs in the gradient pass: as it is ("as_is"), without Dropout and with BatchNorm
#: on batch statistics ("batch_stats"), or without Dropout and with BatchNorm on running statistics
#: ("running_stats").
HEAD_MODES = ("as_is", "batch_stats", "running_stats")


def density_descent_direction(
    estimator: FlowDensityEstimator,
    features: Tensor,
    head: Head | None = None,
    mask: Tensor | None = None,
    chunk_rows: int | Literal["auto"] | None = "auto",
    head_mode: str = "as_is",
    min_grad_ratio: float = 0.0,
) -> Tensor:
    """Per-pixel unit direction in which the summed NLL of the masked pixels grows fastest.

    The head runs once; its output rows go through the flow and the prior in chunks, each chunk
    differentiated on its own, and the row gradients go back through the head in one
    vector-Jacobian product. The result does not depend on the chunking (the NLL is a sum over
    rows, so its gradient splits by rows). Pixels whose gradient is zero (e.g. outside the mask's
    receptive field) get a zero direction.

    ``chunk_rows`` picks the chunks:

    - ``"auto"`` (default): :data:`AUTO_CHUNK_ROWS` rows at a time, so the flow never holds the
      graph of more rows than that. On the CPU only the masked rows are evaluated (finding them
      reads the mask, which costs nothing there), so the flow's time follows the number of masked
      pixels. On CUDA, on any other device, and on the CPU while ``torch.compile`` traces the
      call, every row is evaluated, the unmasked ones weighted by zero, and nothing is read on
      the host. The trade-off: a call that never reads the mask launches the same work for every
      mask of a given shape, and to stay exact when every pixel is masked that work must cover
      every row. A fixed capacity below the row count would either drop the masked rows beyond
      it or need a fallback over all rows that runs on every call; so the capacity is the row
      count, and the chunk size bounds the memory. On a GPU the head's convolutions, which see
      every pixel in any design, are the larger part of the step.
    - ``None``: all rows in one evaluation, unmasked rows weighted by zero; the graph of every row
      is alive at once.
    - ``n``: only the masked rows, ``n`` at a time, on every device. Finding them reads the mask
      count on the host: one synchronisation on CUDA, in exchange for a flow time that follows the
      number of masked rows there too.

    ``"auto"`` and ``None`` are free of host-device synchronisation on CUDA (they can run inside a
    CUDA graph); ``n`` is not.

    Args:
        estimator: the density of the head's output space.
        features: the features to perturb (no gradient is taken through them here).
        head: maps features to the estimator's space; None if they already are there.
        mask: bool, the head-output pixels whose NLL counts; None = all.
        chunk_rows: ``"auto"``, None (one evaluation of all rows) or the rows per evaluation
            of the masked rows; see above.
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
    check_call(features, head, mask, None)
    options = _check_options(chunk_rows, head_mode, min_grad_ratio)
    return _descent_direction(estimator, features, head, mask, *options)


def _descent_direction(
    estimator: FlowDensityEstimator,
    features: Tensor,
    head: Head | None,
    mask: Tensor | None,
    chunk_rows: int | Literal["auto"] | None,
    head_mode: str,
    min_grad_ratio: float,
) -> Tensor:
    """:func:`density_descent_direction` of checked inputs and options."""
    with torch.enable_grad(), _head_in_mode(head, head_mode):
        leaf = features.detach().requires_grad_(True)
        mapped = call_head_without_side_effects(head, leaf)
        layout = _check_head_output(mapped, features, estimator.dim, head is not None)
        if mask is not None and head is not None:
            check_mask_shape(mask, layout.row_shape)
        rows = layout.to_rows(mapped)
        row_mask = None if mask is None else layout.values_to_rows(mask)
        size, masked_only = _chunking(chunk_rows, rows.device)
        row_gradient = _nll_row_gradient(estimator, rows.detach(), row_mask, size, masked_only)
        (gradient,) = torch.autograd.grad(rows, leaf, row_gradient)
    gradient = gradient.to(_at_least_float32(gradient.dtype))
    direction = per_pixel_unit(gradient, channel_dim=1)
    if min_grad_ratio > 0:
        direction = direction * _large_gradient(gradient, mask, min_grad_ratio)
    return direction


def _check_head_output(mapped: Tensor, features: Tensor, dim: int, has_head: bool) -> RowLayout:
    """The layout of the head output, once it is known to keep the features' layout with size D."""
    name = "head output" if has_head else "features"
    if mapped.dim() != features.dim():
        raise ValueError(
            f"head output has shape {tuple(mapped.shape)}; it must keep the layout of the "
            f"features {tuple(features.shape)}"
        )
    if mapped.shape[1] != dim:
        raise ValueError(
            f"{name} has feature size {mapped.shape[1]} (shape {tuple(mapped.shape)}), "
            f"expected D={dim}"
        )
    return RowLayout(mapped)


def _chunking(
    chunk_rows: int | Literal["auto"] | None, device: torch.device
) -> tuple[int | None, bool]:
    """``(rows per flow evaluation or None for all, whether only the masked rows are evaluated)``
    for the rows of a call on ``device``."""
    if isinstance(chunk_rows, str):  # "auto", the only string the options let through
        return AUTO_CHUNK_ROWS, _mask_is_free_to_read(device)
    return chunk_rows, chunk_rows is not None


def _mask_is_free_to_read(device: torch.device) -> bool:
    """Whether finding the masked rows costs no host-device synchronisation and no graph break:
    on the CPU, outside ``torch.compile``'s (or a JIT tracer's) capture."""
    return device.type == "cpu" and not is_tracing()


def _nll_row_gradient(
    estimator: FlowDensityEstimator,
    rows: Tensor,
    row_mask: Tensor | None,
    chunk_rows: int | None,
    masked_only: bool,
) -> Tensor:
    """Gradient of the summed NLL of the ``row_mask`` rows with respect to ``rows``, zero elsewhere.

    The rows go through the flow ``chunk_rows`` at a time (None: in one chunk). With
    ``masked_only`` and a mask, only the masked rows are gathered and evaluated (their count is
    read on the host); otherwise every row is, the unmasked ones weighted by zero, and the chunks
    depend on the shape of ``rows`` alone.
    """
    index = None
    if masked_only and row_mask is not None:
        index = torch.nonzero(row_mask).squeeze(1)
    count = rows.shape[0] if index is None else index.shape[0]
    size = chunk_rows or max(count, 1)
    if index is None and size >= count:
        return _chunk_nll_gradient(estimator, rows, row_mask)
    gradient = torch.zeros_like(rows)
    # An empty selection still runs the flow once, so its checks (e.g. of the dtype) always run.
    for start in range(0, max(count, 1), size):
        stop = min(start + size, count)
        if index is None:
            weights = None if row_mask is None else row_mask[start:stop]
            gradient[start:stop] = _chunk_nll_gradient(estimator, rows[start:stop], weights)
        else:
            chunk = rows.index_select(0, index[start:stop])
            piece = _chunk_nll_gradient(estimator, chunk, None)
            gradient.index_copy_(0, index[start:stop], piece)
    return gradient


def _chunk_nll_gradient(
    estimator: FlowDensityEstimator, rows: Tensor, weights: Tensor | None
) -> Tensor:
    """Gradient of ``sum(weights * -log p(rows))`` with respect to ``rows`` (weights None: ones)."""
    leaf = rows.detach().requires_grad_(True)
    nll = -estimator.log_prob_rows(leaf)
    if weights is not None:
        nll = nll * weights.to(nll.dtype)
    (gradient,) = torch.autograd.grad(nll.sum(), leaf)
    return gradient


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def _large_gradient(gradient: Tensor, mask: Tensor | None, ratio: float) -> Tensor:
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


def _check_options(
    chunk_rows: int | Literal["auto"] | None, head_mode: str, min_grad_ratio: float
) -> tuple[int | Literal["auto"] | None, str, float]:
    """The direction options, checked: ``(chunk_rows, head_mode, min_grad_ratio)``."""
    if (chunk_rows is not None and chunk_rows != "auto") and (
        isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
    ):
        raise ValueError(f"chunk_rows must be 'auto', None or a positive int, got {chunk_rows!r}")
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    ratio = float(min_grad_ratio)
    if not 0.0 <= ratio < float("inf"):
        raise ValueError(f"min_grad_ratio must be a finite number >= 0, got {min_grad_ratio!r}")
    return chunk_rows, head_mode, ratio


@contextlib.contextmanager
def _head_in_mode(head: Head | None, head_mode: str) -> Iterator[None]:
    """Switch the head's Dropout layers off (and its BatchNorm layers to the chosen statistics)
    for the duration of the block; every layer's own mode comes back afterwards."""
    if head_mode == "as_is" or head is None:
        yield
        return
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"head_mode={head_mode!r} switches the head's Dropout and BatchNorm layers, so the "
            f"head must be an nn.Module, got {type(head).__name__}"
        )
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
        chunk_rows: how the density's gradient is computed; the result is the same for every
            value (see :func:`density_descent_direction`). ``"auto"`` (default): chunks of
            :data:`AUTO_CHUNK_ROWS` rows, so the memory of the flow does not grow with the
            number of pixels; on the CPU only the masked pixels are evaluated (fast for sparse
            masks), on CUDA every pixel is, with no host-device synchronisation. None: all
            pixels in one evaluation, synchronisation-free. An integer ``n``: only the masked
            pixels, ``n`` at a time, on every device; on CUDA it reads the mask count on the host.
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
        chunk_rows: int | Literal["auto"] | None = "auto",
        head_mode: str = "as_is",
        min_grad_ratio: float = 0.0,
    ):
        super().__init__()
        self.estimator = check_estimator(estimator)
        self.eps = check_positive(eps, "eps")
        self.chunk_rows, self.head_mode, self.min_grad_ratio = _check_options(
            chunk_rows, head_mode, min_grad_ratio
        )

    def extra_repr(self) -> str:
        options = "" if self.chunk_rows == "auto" else f", chunk_rows={self.chunk_rows!r}"
        if self.head_mode != "as_is":
            options += f", head_mode={self.head_mode!r}"
        if self.min_grad_ratio > 0:
            options += f", min_grad_ratio={self.min_grad_ratio}"
        return f"eps={self.eps}{options}"

    def perturb(
        self, features: Tensor, head: Head | None, mask: Tensor | None, generator: Generator | None
    ) -> Tensor:
        direction = _descent_direction(
            self.estimator,
            features,
            head,
            mask,
            self.chunk_rows,
            self.head_mode,
            self.min_grad_ratio,
        )
        return features + (self.eps * direction).to(features.dtype)
