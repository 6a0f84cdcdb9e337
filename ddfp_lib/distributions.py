"""The latent prior: a uniform mixture of unit-covariance Gaussians, one component per class.

    p(z) = (1/K) sum_k N(z; mu_k, I)

Component log-densities come from the expanded square ``||z||^2 - 2 z.mu + ||mu||^2`` (one matmul,
never an ``(N, K, D)`` tensor). Latents and means are first centred on the mean of the means: without
that, a shared offset makes the expanded form cancel catastrophically in float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GaussianMixturePrior", "component_log_prob", "class_log_prob", "mixture_log_prob"]


def _log_normalizer(dim: int) -> float:
    return 0.5 * dim * math.log(2.0 * math.pi)


def component_log_prob(z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``log N(z_n; mu_k, I)`` for every row and component.

    Shape:
        - z: ``(N, D)``, means: ``(K, D)`` -> ``(N, K)``
    """
    centre = means.mean(dim=0, keepdim=True)
    zc = z - centre
    mc = means - centre
    squared = (zc * zc).sum(dim=1, keepdim=True) - 2.0 * (zc @ mc.t()) + (mc * mc).sum(dim=1)
    return -0.5 * squared.clamp_min(0.0) - _log_normalizer(z.shape[1])


def mixture_log_prob(z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``log (1/K) sum_k N(z; mu_k, I)`` per row.

    Shape:
        - z: ``(N, D)``, means: ``(K, D)`` -> ``(N,)``
    """
    return torch.logsumexp(component_log_prob(z, means), dim=1) - math.log(means.shape[0])


def class_log_prob(z: torch.Tensor, means: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log N(z_n; mu_{y_n}, I)`` per row, from the direct square (no cancellation).

    Shape:
        - z: ``(N, D)``, means: ``(K, D)``, labels: ``(N,)`` long in ``[0, K)`` -> ``(N,)``
    """
    diff = z - means.index_select(0, labels)
    return -0.5 * (diff * diff).sum(dim=1) - _log_normalizer(z.shape[1])


class GaussianMixturePrior(nn.Module):
    """Uniform mixture of unit-covariance Gaussians ``(1/K) sum_k N(z; mu_k, I)``.

    Args:
        dim: latent size D.
        num_classes: number of components K, one per class.
        learn_means: if True the means are a parameter (trained with the flow), else a buffer.
        generator: draws the initial means from N(0, I); None uses the global RNG.

    Shape:
        - means: ``(K, D)``
        - log_prob: z ``(N, D)``, labels ``(N,)`` -> ``(N,)``

    References:
        Izmailov et al., "Semi-Supervised Learning with Normalizing Flows", ICML 2020.

    Examples:
        >>> prior = GaussianMixturePrior(dim=3, num_classes=2)
        >>> prior.log_prob(torch.zeros(5, 3)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        learn_means: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if dim < 1 or num_classes < 1:
            raise ValueError(f"dim and num_classes must be >= 1, got {dim} and {num_classes}")
        means = torch.randn(num_classes, dim, generator=generator)
        if learn_means:
            self.means = nn.Parameter(means)
        else:
            self.register_buffer("means", means)

    def log_prob(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mixture log-density, or the own component's where ``labels >= 0`` (labels assumed valid)."""
        means = self.means.to(z.dtype)
        mixture = mixture_log_prob(z, means)
        if labels is None:
            return mixture
        conditional = class_log_prob(z, means, labels.clamp_min(0))
        return torch.where(labels >= 0, conditional, mixture)
