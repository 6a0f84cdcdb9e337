"""Input checks and layout changes shared by the public modules.

Feature tensors arrive in three layouts: rows ``(N, D)``, maps ``(B, D, H, W)`` and token sequences
``(B, N, D)``. Every module works on rows internally; :class:`RowLayout` converts in and out.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from einops import rearrange

__all__ = [
    "RowLayout",
    "autocast_off",
    "check_finite",
    "check_mask",
    "check_positive",
    "is_tracing",
]


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


class RowLayout:
    """Flatten a feature tensor to rows ``(N, D)`` and restore its layout afterwards.

    Args:
        x: features in one of the layouts ``(N, D)``, ``(B, D, H, W)`` or ``(B, N, D)``.
        dim: the expected feature size ``D``; None accepts any.
        name: how error messages refer to ``x``.

    Shape:
        - ``(N, D)``: rows as they are; per-row values come back as ``(N,)``.
        - ``(B, D, H, W)``: channel dimension second; per-row values come back as ``(B, H, W)``.
        - ``(B, N, D)``: feature dimension last; per-row values come back as ``(B, N)``.
    """

    def __init__(self, x: torch.Tensor, dim: int | None = None, name: str = "features"):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() not in (2, 3, 4):
            raise ValueError(
                f"{name} must have shape (N, D), (B, N, D) or (B, D, H, W); got {tuple(x.shape)}"
            )
        self.ndim = x.dim()
        self.shape = tuple(x.shape)
        feature_axis = 1 if self.ndim in (2, 4) else 2
        self.feature_size = x.shape[feature_axis]
        if dim is not None and self.feature_size != dim:
            layout = {2: "(N, D)", 3: "(B, N, D)", 4: "(B, D, H, W)"}[self.ndim]
            raise ValueError(
                f"{name} has feature size {self.feature_size} in layout {layout} "
                f"(shape {self.shape}), expected D={dim}"
            )

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape that per-row values (labels, masks, log-densities) have in this layout."""
        if self.ndim == 2:
            return (self.shape[0],)
        if self.ndim == 3:
            return self.shape[:2]
        return (self.shape[0], self.shape[2], self.shape[3])

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this layout -> ``(N, D)``."""
        if self.ndim == 2:
            return x
        if self.ndim == 3:
            return rearrange(x, "b n d -> (b n) d")
        return rearrange(x, "b d h w -> (b h w) d")

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


def check_mask(
    mask: torch.Tensor | None, row_shape: tuple[int, ...], name: str = "mask"
) -> torch.Tensor | None:
    """Check that ``mask`` is a bool tensor of ``row_shape`` (None passes through)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(row_shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, expected {tuple(row_shape)} "
            "(one entry per pixel of the head output)"
        )
    return mask
