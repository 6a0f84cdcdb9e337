"""Glow-style affine coupling flows on nflows' transform abstractions.

A block transforms both halves of its input in turn,

    y1 = x1 * exp(s1(x2)) + t1(x2),    y2 = x2 * exp(s2(y1)) + t2(y1),

with the log-scale soft-clamped as ``s = clamp * 0.636 * atan(raw / clamp)`` so that
``|s| < clamp``. A fixed random permutation follows every block.

References:
    Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from nflows.transforms.base import CompositeTransform, Transform
from nflows.transforms.permutations import Permutation
from torch import nn

__all__ = ["GlowCoupling", "build_glow_flow", "coupling_subnet", "soft_clamp"]

# 2 / pi rounded as in Glow's reference implementations, so that log-scales stay below ``clamp``.
_ATAN_SCALE = 0.636


def soft_clamp(raw: torch.Tensor, clamp: float) -> torch.Tensor:
    """Smoothly bound a raw log-scale to ``(-clamp, clamp)``: ``clamp * 0.636 * atan(raw / clamp)``."""
    return clamp * _ATAN_SCALE * torch.atan(raw / clamp)


def coupling_subnet(in_dim: int, out_dim: int, hidden_dim: int) -> nn.Sequential:
    """The MLP that predicts log-scale and shift: Linear-ReLU-Linear-ReLU-Linear.

    The last layer starts at zero, so a new coupling is the identity.
    """
    net = nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, out_dim),
    )
    last = cast(nn.Linear, net[-1])
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return net


class GlowCoupling(Transform):
    """Glow affine coupling that transforms both halves: ``y1 = x1 e^{s1(x2)} + t1(x2)``,
    ``y2 = x2 e^{s2(y1)} + t2(y1)``.

    Halves are contiguous slices (no index gathers), and each subnet predicts log-scale and shift
    together in one matmul.

    Args:
        dim: input size D (>= 2).
        hidden_dim: width of the subnets' hidden layers.
        clamp: bound on the absolute log-scale.

    Shape:
        - inputs: ``(N, D)``
        - outputs: ``(N, D)`` and ``log|det dy/dx|`` of shape ``(N,)``

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.

    Examples:
        >>> coupling = GlowCoupling(6, hidden_dim=16)
        >>> x = torch.randn(4, 6)
        >>> y, log_det = coupling(x)
        >>> bool(torch.equal(y, x)), log_det.abs().max().item()
        (True, 0.0)
    """

    def __init__(self, dim: int, hidden_dim: int = 256, clamp: float = 2.0):
        if dim < 2:
            raise ValueError(f"a coupling needs at least 2 features, got {dim}")
        if clamp <= 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        super().__init__()
        self.dim = dim
        self.split = dim // 2
        self.clamp = float(clamp)
        first, second = self.split, dim - self.split
        self.subnet1 = coupling_subnet(second, 2 * first, hidden_dim)
        self.subnet2 = coupling_subnet(first, 2 * second, hidden_dim)

    def _scale_shift(
        self, subnet: nn.Module, condition: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raw = subnet(condition)
        log_scale = soft_clamp(raw[:, :size], self.clamp)
        return log_scale, raw[:, size:]

    def forward(
        self, inputs: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = inputs[:, : self.split], inputs[:, self.split :]
        s1, t1 = self._scale_shift(self.subnet1, x2, self.split)
        y1 = x1 * torch.exp(s1) + t1
        s2, t2 = self._scale_shift(self.subnet2, y1, self.dim - self.split)
        y2 = x2 * torch.exp(s2) + t2
        log_det = s1.sum(dim=1) + s2.sum(dim=1)
        return torch.cat([y1, y2], dim=1), log_det

    def inverse(
        self, inputs: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y1, y2 = inputs[:, : self.split], inputs[:, self.split :]
        s2, t2 = self._scale_shift(self.subnet2, y1, self.dim - self.split)
        x2 = (y2 - t2) * torch.exp(-s2)
        s1, t1 = self._scale_shift(self.subnet1, x2, self.split)
        x1 = (y1 - t1) * torch.exp(-s1)
        log_det = -(s1.sum(dim=1) + s2.sum(dim=1))
        return torch.cat([x1, x2], dim=1), log_det


def build_glow_flow(
    dim: int,
    num_blocks: int = 2,
    hidden_dim: int = 256,
    clamp: float = 2.0,
    generator: torch.Generator | None = None,
) -> CompositeTransform:
    """Stack ``num_blocks`` × (GlowCoupling, fixed random permutation) as an nflows transform.

    Args:
        dim: feature size D.
        num_blocks: number of coupling blocks.
        hidden_dim: subnet width.
        clamp: log-scale bound of every coupling.
        generator: draws the permutations and the subnets' first layers; None uses the global RNG.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    transforms: list[Transform] = []
    for _ in range(num_blocks):
        coupling = GlowCoupling(dim, hidden_dim, clamp)
        if generator is not None:
            _reinit_hidden_layers(coupling, generator)
        transforms.append(coupling)
        transforms.append(Permutation(torch.randperm(dim, generator=generator)))
    return CompositeTransform(transforms)


def _reinit_hidden_layers(coupling: GlowCoupling, generator: torch.Generator) -> None:
    """Kaiming-uniform init of the non-final subnet layers from ``generator`` (nn.Linear's default law)."""
    for subnet in (coupling.subnet1, coupling.subnet2):
        for layer in list(subnet)[:-1]:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                with torch.no_grad():
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)
