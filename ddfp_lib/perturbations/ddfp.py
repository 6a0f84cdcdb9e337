"""Density-Descending Feature Perturbation (DDFP).

    delta = eps * g / ||g||_2 (per pixel, over channels),    g = d/d(features) sum_{masked} -log p(head(features))

The perturbed features ``features + delta`` lie lower on the learned feature density; the classifier
is then trained to keep its prediction for them.

Two options shape the direction; their defaults leave it as the reference computes it:

- ``head_mode``: the head's Dropout makes the direction random (in training, two calls on the same
  input agree with a median per-pixel cosine of about 0.55-0.8 for DeepLabV3+'s fuse block), and
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
)

__all__ = [
    "AUTO_CHUNK_ROWS",
    "HEAD_MODES",
    "DensityDescendingPerturbation",
    "density_descent_direction",
]

#: Rows per flow evaluation of ``chunk_rows="auto"``: enough rows that the per-chunk overhead is
#: small, few enough that the flow's graph stays well below the head's activations (on the CPU,
#: 4x304x129x129 features with 30 % of the pixels masked take the same time in chunks of 4,096 as
#: in chunks of 16,384, with a flow graph a quarter the size; 131k rows took 4.2 s in chunks of
#: 16,384 against 8.7 s in one evaluation).
AUTO_CHUNK_ROWS = 4096

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

    Where only the masked rows are evaluated, they are gathered straight from the head's output,
    and the output is released before the head's backward pass: the step then needs about the
    memory of the head's own forward and backward pass, plus one chunk of the flow.

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
        size, masked_only = _chunking(chunk_rows, mapped.device)
        if masked_only and mask is not None:
            held = [mapped, _masked_nll_gradient(estimator, mapped.detach(), layout, mask, size)]
            del mapped
            gradient = _backward_through_head(leaf, held)
        else:
            rows = layout.to_rows(mapped)
            row_mask = None if mask is None else layout.values_to_rows(mask)
            row_gradient = _nll_row_gradient(estimator, rows.detach(), row_mask, size)
            (gradient,) = torch.autograd.grad(rows, leaf, row_gradient)
    gradient = gradient.to(_at_least_float32(gradient.dtype))
    keep = None if min_grad_ratio <= 0 else _large_gradient(gradient, mask, min_grad_ratio)
    # The gradient is this call's own tensor: it becomes the direction in place (the values of
    # per_pixel_unit: a zero gradient divided by the clamped norm stays exactly zero).
    norm = torch.linalg.vector_norm(gradient, dim=1, keepdim=True)
    direction = gradient.div_(norm.clamp_min_(torch.finfo(gradient.dtype).tiny))
    return direction if keep is None else direction.mul_(keep)


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
    estimator: FlowDensityEstimator, rows: Tensor, row_mask: Tensor | None, chunk_rows: int | None
) -> Tensor:
    """Gradient of the summed NLL of the ``row_mask`` rows with respect to ``rows``, zero elsewhere.

    Every row goes through the flow, ``chunk_rows`` at a time (None: in one chunk), the unmasked
    ones weighted by zero: the chunks depend on the shape of ``rows`` alone and nothing is read on
    the host.
    """
    count = rows.shape[0]
    size = chunk_rows or max(count, 1)
    if size >= count:
        return _chunk_nll_gradient(estimator, rows, row_mask)
    gradient = torch.zeros_like(rows)
    for start in range(0, count, size):
        stop = min(start + size, count)
        weights = None if row_mask is None else row_mask[start:stop]
        gradient[start:stop] = _chunk_nll_gradient(estimator, rows[start:stop], weights)
    return gradient


def _masked_nll_gradient(
    estimator: FlowDensityEstimator,
    mapped: Tensor,
    layout: RowLayout,
    mask: Tensor,
    chunk_rows: int | None,
) -> Tensor:
    """Gradient of the summed NLL of the masked pixels with respect to ``mapped``, zero elsewhere.

    Only the masked rows are gathered (their count is read on the host), ``chunk_rows`` at a time
    (None: in one chunk), straight from ``mapped`` in its own layout and memory format: no copy of
    every row is made, and the gradient comes back in the layout of ``mapped``, as the head's
    backward pass wants it.
    """
    rows = layout.feature_last(mapped)
    index = torch.nonzero(mask, as_tuple=True)
    count = index[0].shape[0]
    size = chunk_rows or max(count, 1)
    gradient = torch.zeros_like(mapped)
    gradient_rows = layout.feature_last(gradient)
    # An empty selection still runs the flow once, so its checks (e.g. of the dtype) always run.
    for start in range(0, max(count, 1), size):
        chunk = tuple(i[start : start + size] for i in index)
        piece = _chunk_nll_gradient(estimator, rows[chunk], None)
        gradient_rows.index_put_(chunk, piece)
    return gradient


def _backward_through_head(leaf: Tensor, held: list[Tensor]) -> Tensor:
    """``d/d leaf <outputs, weights>`` for ``held = [outputs, weights]``: the vector-Jacobian
    product of the head at ``weights``; ``held`` is emptied.

    The head's output is needed only to start the backward pass, but autograd keeps whatever its
    caller keeps. So the product starts from a scalar, the inner product of the two as flat views
    of the same memory order, and the output and the weights are released before the backward
    pass runs: the output (which no layer of the head keeps for its own gradient when the head
    ends in Dropout or BatchNorm) is freed, and the weights once the inner product's backward has
    used them. The result equals ``autograd.grad(outputs, leaf, weights)`` exactly; that is
    computed instead when the two do not share a flat memory order or are not float32/float64.
    """
    outputs, weights = held
    held.clear()
    flat = _flat_views(outputs, weights)
    if flat is None:
        return torch.autograd.grad(outputs, leaf, weights)[0]
    product = torch.dot(*flat)
    del outputs, weights, flat
    return torch.autograd.grad(product, leaf)[0]


def _flat_views(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
    """``a`` and ``b`` as 1-D views in the same element order, or None if there are none."""
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float64) or a.shape != b.shape:
        return None
    if a.is_contiguous() and b.is_contiguous():
        return a.view(-1), b.view(-1)
    if a.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in (a, b)):
        return a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1)
    return None


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
        # The direction is this call's own tensor: the step is scaled in place.
        return features + direction.mul_(self.eps).to(features.dtype)
