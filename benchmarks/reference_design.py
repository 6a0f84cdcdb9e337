"""The perturbation step as the public DDFP code designs it, rebuilt as the benchmarks' baseline.

Design (github.com/Gavinwxy/DDFP, ``model/flow`` and ``model/model/attack.py``):

- flow: FrEIA ``GLOWCouplingBlock`` x n + ``PermuteRandom`` (seed = block index) in a FrEIA graph
  network, subnets Linear-ReLU-Linear-ReLU-Linear;
- prior: a uniform mixture of unit-covariance Gaussians whose component log-densities come from the
  features repeated to an ``(N, K, D)`` tensor, then a logsumexp over components;
- valid pixels are selected with a boolean mask (``h_rows[mask]``) before the flow;
- ``noise = 0`` is added to the decoder input, the fuse block maps it to the density space, the mean
  NLL of the valid rows is differentiated with respect to ``noise`` in one autograd call and the
  gradient is L2-normalised per pixel: ``delta = eps * g / max(||g||, 1e-12)``.

:func:`copy_reference_flow` makes a :class:`ddfp_lib.FlowDensityEstimator` compute exactly the same
function as a :class:`ReferenceDensity`, so that the two designs can be timed on identical work.
"""

from __future__ import annotations

import math

import FrEIA.framework as freia_framework
import FrEIA.modules as freia_modules
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import fuse_block
from ddfp_lib import FlowDensityEstimator
from ddfp_lib.flows import GlowCoupling

__all__ = [
    "ReferenceDensity",
    "copy_reference_flow",
    "fuse_block",
    "reference_perturbation",
    "repeated_mixture_log_prob",
]


def repeated_mixture_log_prob(z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``log (1/K) sum_k N(z; mu_k, I)`` from the latents repeated over components.

    Builds the ``(N, K, D)`` difference tensor on purpose: that is the cost being measured.

    Shape:
        - z: ``(N, D)``, means: ``(K, D)`` -> ``(N,)``
    """
    if z.dim() != 2 or means.dim() != 2 or z.shape[1] != means.shape[1]:
        raise ValueError(
            f"z must be (N, D) and means (K, D) with the same D, got {tuple(z.shape)} "
            f"and {tuple(means.shape)}"
        )
    num_components, dim = means.shape
    centred = z.unsqueeze(1).repeat(1, num_components, 1) - means.unsqueeze(0)
    inverse_variance = torch.ones(num_components, 1, dtype=z.dtype, device=z.device)
    mahalanobis = torch.sum(centred**2 * inverse_variance.unsqueeze(0), dim=2)
    log_det_covariance = torch.zeros(z.shape[0], num_components, dtype=z.dtype, device=z.device)
    component = -0.5 * (dim * math.log(2.0 * math.pi) + mahalanobis + log_det_covariance)
    log_weights = torch.log_softmax(torch.ones(num_components, dtype=z.dtype, device=z.device), 0)
    return torch.logsumexp(component + log_weights, dim=1)


def _subnet_constructor(hidden_features: int):
    def build(in_features: int, out_features: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(in_features, hidden_features),
            nn.ReLU(),
            nn.Linear(hidden_features, hidden_features),
            nn.ReLU(),
            nn.Linear(hidden_features, out_features),
        )

    return build


class ReferenceDensity(nn.Module):
    """FrEIA Glow flow + repeated-tensor Gaussian mixture: ``log p(x) = log p_mix(f(x)) + log|det|``.

    Parameters start as ``0.05 * randn`` like the reference code's flow.

    Args:
        dim: feature size D.
        num_classes: mixture components K.
        num_blocks: coupling blocks, each followed by ``PermuteRandom(seed=block index)``.
        hidden_dim: subnet width.
        clamp: FrEIA's soft clamp of the log-scale (``clamp * 0.636 * atan(u)`` in FrEIA 0.2).
        seed: seeds the weights and the means.

    Shape:
        - x: ``(N, D)`` -> ``log_prob`` ``(N,)``; means ``(K, D)``
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_blocks: int = 2,
        hidden_dim: int = 256,
        clamp: float = 2.0,
        seed: int = 0,
    ):
        super().__init__()
        self.dim = dim
        self.clamp = float(clamp)
        nodes = [freia_framework.InputNode(dim, name="input")]
        for k in range(num_blocks):
            nodes.append(
                freia_framework.Node(
                    nodes[-1],
                    freia_modules.GLOWCouplingBlock,
                    {"subnet_constructor": _subnet_constructor(hidden_dim), "clamp": clamp},
                    name=f"coupling_{k}",
                )
            )
            nodes.append(
                freia_framework.Node(
                    nodes[-1], freia_modules.PermuteRandom, {"seed": k}, name=f"permute_{k}"
                )
            )
        nodes.append(freia_framework.OutputNode(nodes[-1], name="output"))
        self.inn = freia_framework.GraphINN(nodes, verbose=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.inn.parameters():
                if p.requires_grad:
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        self.means = nn.Parameter(torch.randn(num_classes, dim, generator=generator))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``(N, D)`` and ``log|det dz/dx|`` ``(N,)``."""
        z, log_det = self.inn(x)
        return z, log_det

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture log-density of every row ``(N,)``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (N, {self.dim}), got {tuple(x.shape)}")
        z, log_det = self(x)
        return repeated_mixture_log_prob(z, self.means.to(z.dtype)) + log_det

    def couplings(self) -> list[freia_modules.GLOWCouplingBlock]:
        """The coupling blocks in flow order."""
        return [m for m in self.inn.modules() if isinstance(m, freia_modules.GLOWCouplingBlock)]

    def permutations(self) -> list[torch.Tensor]:
        """The permutation index after each block, in flow order (``y = x[:, perm]``)."""
        return [
            m.perm.detach()
            for m in self.inn.modules()
            if isinstance(m, freia_modules.PermuteRandom)
        ]


def _copy_subnet(source: nn.Sequential, target: nn.Sequential, scale_rows: int, factor: float):
    for src, dst in zip(source, target):
        if isinstance(src, nn.Linear):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    last = target[-1]
    last.weight[:scale_rows].mul_(factor)
    last.bias[:scale_rows].mul_(factor)


@torch.no_grad()
def copy_reference_flow(reference: ReferenceDensity, estimator: FlowDensityEstimator) -> None:
    """Make ``estimator`` compute the same ``log p`` as ``reference`` (weights, permutations, means).

    FrEIA's first coupling (``subnet2``, conditioned on the second half) is ddfp_lib's ``subnet1``
    and vice versa; both put the log-scale rows before the shift rows. FrEIA 0.2 clamps the raw
    log-scale ``u`` as ``clamp * 0.636 * atan(u)`` and ddfp_lib as ``clamp * 0.636 * atan(r / clamp)``,
    so the log-scale rows of the last layer are multiplied by ``clamp`` (exact for a power of two).
    """
    couplings = [m for m in estimator.flow._transforms if isinstance(m, GlowCoupling)]
    permutations = [m for m in estimator.flow._transforms if not isinstance(m, GlowCoupling)]
    sources = reference.couplings()
    if len(couplings) != len(sources) or estimator.dim != reference.dim:
        raise ValueError("reference and estimator differ in size or number of blocks")
    for source, target in zip(sources, couplings):
        if source.split_len1 != target.split or source.clamp != target.clamp:
            raise ValueError("reference and estimator couplings split or clamp differently")
        _copy_subnet(source.subnet2, target.subnet1, target.split, target.clamp)
        _copy_subnet(source.subnet1, target.subnet2, target.dim - target.split, target.clamp)
    for source_perm, target in zip(reference.permutations(), permutations):
        target._permutation.copy_(source_perm)
    estimator.prior.means.copy_(reference.means)


def reference_perturbation(
    density: ReferenceDensity,
    head: nn.Module | None,
    features: torch.Tensor,
    valid: torch.Tensor,
    eps: float = 4.0,
) -> torch.Tensor:
    """The reference design's perturbation ``delta`` of the decoder input.

    Args:
        density: the flow + prior of the head's output space.
        head: the fuse block, called as it is (in its current train/eval mode); None when the
            features already live in the density space.
        features: decoder input ``v`` (a map), or feature rows.
        valid: bool, the head-output pixels (or rows) whose NLL counts.
        eps: per-pixel L2 norm of ``delta``.

    Shape:
        - features: ``(B, C, H, W)`` with valid ``(B, H, W)``, or ``(N, C)`` with valid ``(N,)``
        - returns: shape of ``features``
    """
    pixel_shape = (features.shape[0], *features.shape[2:])
    if features.dim() not in (2, 4) or tuple(valid.shape) != pixel_shape:
        raise ValueError(
            "features must be (B, C, H, W) with valid (B, H, W), or (N, C) with valid (N,); "
            f"got {tuple(features.shape)} and {tuple(valid.shape)}"
        )
    if not bool(valid.any()):
        raise ValueError(
            "valid selects no pixel: the reference design has no loss to differentiate"
        )
    noise = torch.zeros_like(features, requires_grad=True)
    with torch.enable_grad():
        perturbed = features.detach() + noise
        mapped = head(perturbed) if head is not None else perturbed
        channels = mapped.shape[1]
        rows = mapped.permute(0, 2, 3, 1).reshape(-1, channels) if mapped.dim() == 4 else mapped
        selected = rows[valid.reshape(-1)]
        loss = -density.log_prob(selected).mean()
        (gradient,) = torch.autograd.grad(loss, noise)
    return eps * F.normalize(gradient, p=2, dim=1)
