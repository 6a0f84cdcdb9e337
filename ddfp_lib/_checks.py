"""Input checks and layout changes shared by the public modules.

Feature tensors arrive in three layouts: rows ``(N, D)``, maps ``(B, D, H, W)`` and token sequences
``(B, N, D)``. The public entry points check them once, with :func:`check_features`; every module
works on rows internally, and :class:`RowLayout` converts in and out of a checked tensor.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from einops import rearrange

__all__ = [
    "RowLayout",
    "autocast_off",
    "check_features",
    "check_finite",
    "check_mask",
    "check_mask_shape",
    "check_positive",
    "is_tracing",
]

#: How error messages write each layout, by its number of dimensions.
LAYOUTS = {2: "(N, D)", 3: "(B, N, D)", 4: "(B, D, H, W)"}


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Context that switches autocast off on ``device_type``, so a block computes in the dtype it gets."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def is_tracing() -> bool:
    """True while torch.compile or a JIT tracer is capturing the current call."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    return bool(torch.jit.is_tracing())


def check_positive(value: float, name: str) -> float:
    """Return ``value`` as float, or raise ValueError naming ``name`` if it is not > 0."""
    value = float(value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_finite(x: torch.Tensor, name: str, sync_free: bool = False) -> None:
    """Reject NaN or Inf in ``x``.

    A ValueError is raised, except with ``sync_free`` on CUDA, where the check is a device-side
    assertion so that the host never waits for the device, and with ``sync_free`` while tracing.
    Other accelerators (MPS) have no device-side assertion and get the ValueError too.
    """
    if sync_free and (x.device.type == "cuda" or is_tracing()):
        if x.device.type == "cuda":
            torch._assert_async(torch.isfinite(x).all(), f"{name} contains NaN or Inf")
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_features(
    x: object,
    name: str = "features",
    ndims: tuple[int, ...] = (2, 3, 4),
    dim: int | None = None,
    sync_free: bool = False,
) -> None:
    """Raise ValueError unless ``x`` is a finite floating tensor in a layout of ``ndims``.

    Args:
        x: the tensor to check.
        name: how error messages refer to ``x``.
        ndims: the accepted numbers of dimensions (see :data:`LAYOUTS`).
        dim: the expected feature size ``D``; None accepts any.
        sync_free: check finiteness without a host-device synchronisation (see :func:`check_finite`).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        layouts = " or ".join(LAYOUTS[n] for n in ndims)
        raise ValueError(f"{name} must have shape {layouts}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    size = x.shape[RowLayout(x).feature_axis]
    if dim is not None and size != dim:
        raise ValueError(
            f"{name} has feature size {size} in layout {LAYOUTS[x.dim()]} "
            f"(shape {tuple(x.shape)}), expected D={dim}"
        )
    check_finite(x, name, sync_free)


class RowLayout:
    """Flatten a feature tensor to rows ``(N, D)`` and restore its layout afterwards.

    The tensor is not checked here: it comes from a public entry point that checked it.

    Args:
        x: features in one of the layouts ``(N, D)``, ``(B, D, H, W)`` or ``(B, N, D)``.

    Shape:
        - ``(N, D)``: rows as they are; per-row values come back as ``(N,)``.
        - ``(B, D, H, W)``: channel dimension second; per-row values come back as ``(B, H, W)``.
        - ``(B, N, D)``: feature dimension last; per-row values come back as ``(B, N)``.
    """

    def __init__(self, x: torch.Tensor):
        self.ndim = x.dim()
        self.shape = tuple(x.shape)
        self.feature_axis = 2 if self.ndim == 3 else 1

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape that per-row values (labels, masks, log-densities) have in this layout."""
        return self.shape[: self.feature_axis] + self.shape[self.feature_axis + 1 :]

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this layout -> ``(N, D)``."""
        if self.ndim == 2:
            return x
        if self.ndim == 3:
            return rearrange(x, "b n d -> (b n) d")
        return rearrange(x, "b d h w -> (b h w) d")

    def feature_last(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this layout as a view with the feature dimension last: ``(*row_shape, D)``.

        Indexing it with a mask (or its ``nonzero`` indices) of :attr:`row_shape` gathers rows
        without copying the others.
        """
        return x.movedim(self.feature_axis, -1)

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` -> this layout."""
        if self.ndim == 2:
            return rows
        if self.ndim == 3:
            return rearrange(rows, "(b n) d -> b n d", b=self.shape[0])
        b, _, h, w = self.shape
        return rearrange(rows, "(b h w) d -> b d h w", b=b, h=h, w=w)

    def values_to_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values in this layout (``row_shape``) -> ``(N,)``."""
        return values.reshape(-1)

    def values_from_rows(self, values: torch.Tensor) -> torch.Tensor:
        """``(N,)`` -> ``row_shape``."""
        return values.reshape(self.row_shape)


def check_mask(mask: object, row_shape: tuple[int, ...], spatial: bool = True) -> None:
    """Raise ValueError unless ``mask`` is a bool tensor with one entry per row of ``row_shape``.

    With ``spatial=False`` the mask of a map may have another spatial size than ``row_shape``
    (a mask at a head output's resolution, compared with :func:`check_mask_shape` once the head
    has run); its number of dimensions and batch size must still match.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if spatial or len(row_shape) == 1:
        check_mask_shape(mask, row_shape)
    elif mask.dim() != len(row_shape) or mask.shape[0] != row_shape[0]:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected ({row_shape[0]}, H', W') "
            "(one entry per pixel of the head output)"
        )


def check_mask_shape(mask: torch.Tensor, row_shape: tuple[int, ...]) -> None:
    """Raise ValueError unless the (checked) ``mask`` has exactly ``row_shape``."""
    if tuple(mask.shape) != tuple(row_shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected {tuple(row_shape)} "
            "(one entry per pixel of the head output)"
        )
