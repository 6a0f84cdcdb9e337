"""Density-Descending Feature Perturbation (DDFP).

    delta = eps * g / ||g||_2 (per pixel, over channels),    g = d/d(features) sum_{masked} -log p(head(features))

The perturbed features ``features + delta`` lie lower on the learned feature density; the classifier
is then trained to keep its prediction for them.
"""

from __future__ import annotations

import torch

from .._checks import RowLayout, check_mask, check_positive
from ..density import FlowDensityEstimator
from .base import FeaturePerturbation, Head, call_head_without_side_effects, per_pixel_unit

__all__ = ["DensityDescendingPerturbation", "density_descent_direction"]


def density_descent_direction(
    estimator: FlowDensityEstimator,
    features: torch.Tensor,
    head: Head | None = None,
    mask: torch.Tensor | None = None,
    chunk_rows: int | None = None,
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

    Shape:
        - features: ``(B, C, H, W)`` or ``(N, C)``; head output ``(B, D, H', W')`` or ``(N, D)``
        - mask: ``(B, H', W')`` or ``(N,)``
        - returns: shape of ``features``, float32 (float64 for float64 features), unit or zero
          norm per pixel
    """
    _check_chunk_rows(chunk_rows)
    with torch.enable_grad():
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
    return per_pixel_unit(gradient.to(_at_least_float32(gradient.dtype)), channel_dim=1)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


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
        self, estimator: FlowDensityEstimator, eps: float = 4.0, chunk_rows: int | None = None
    ):
        super().__init__()
        if not isinstance(estimator, FlowDensityEstimator):
            raise ValueError(
                f"estimator must be a FlowDensityEstimator, got {type(estimator).__name__}"
            )
        self.estimator = estimator
        self.eps = check_positive(eps, "eps")
        self.chunk_rows = _check_chunk_rows(chunk_rows)

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_rows is None else f", chunk_rows={self.chunk_rows}"
        return f"eps={self.eps}{chunk}"

    def perturb(
        self,
        features: torch.Tensor,
        head: Head | None,
        mask: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        direction = density_descent_direction(self.estimator, features, head, mask, self.chunk_rows)
        delta = (self.eps * direction).to(features.dtype)
        return features + delta
