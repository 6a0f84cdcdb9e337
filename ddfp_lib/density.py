"""FlowDensityEstimator: a normalizing flow with a class-conditional Gaussian-mixture prior.

    log p(x) = log p_prior(f(x)) + log|det df/dx|,    p_prior(z) = (1/K) sum_k N(z; mu_k, I)

References:
    Wang et al., "Towards the Uncharted: Density-Descending Feature Perturbation for Semi-supervised
    Semantic Segmentation", CVPR 2024.
    Izmailov et al., "Semi-Supervised Learning with Normalizing Flows", ICML 2020.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import RowLayout, autocast_off, check_features
from .distributions import GaussianMixturePrior
from .flows import build_glow_flow

__all__ = ["FlowDensityEstimator", "UNKNOWN_CLASS"]

#: Label of a row whose class is unknown: its density is the whole mixture.
UNKNOWN_CLASS = -1

_COMPUTE_DTYPES = {torch.float32, torch.float64}
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


class FlowDensityEstimator(nn.Module):
    """Density of segmentation features: Glow coupling flow + per-class Gaussian-mixture prior.

    ``log p(x) = log (1/K) sum_k N(f(x); mu_k, I) + log|det df/dx|``; a row with label y in
    ``[0, K)`` uses its own component ``N(f(x); mu_y, I)`` instead of the mixture.

    Fresh estimators are exactly their fixed permutations: the last layer of every coupling subnet
    starts at zero. The flow and the prior compute in the dtype of the estimator's parameters:
    float32 by default, also under ``torch.autocast`` and for half-precision inputs, or float64
    after ``.double()`` (for gradient checks and exact comparisons). Half-precision parameters
    (``.half()``, ``.bfloat16()``) are refused: autocast already gives the mixed precision.

    Args:
        dim: feature size D (256 for DeepLabV3+'s fuse block).
        num_classes: number of mixture components K (one per class).
        num_blocks: coupling blocks, each followed by a fixed random permutation.
        hidden_dim: width of the coupling subnets.
        clamp: bound on every coupling's absolute log-scale.
        learn_means: train the mixture means with the flow (True) or keep them fixed.
        seed: seeds permutations, subnet init and means; None uses the global RNG.

    Shape:
        - x: ``(N, D)``, ``(B, D, H, W)`` or ``(B, N, D)``
        - per-row outputs (``log_prob``, ``log_det``, ``labels``): ``(N,)``, ``(B, H, W)`` or ``(B, N)``
        - ``means``: ``(K, D)``

    References:
        Wang et al., "Towards the Uncharted: Density-Descending Feature Perturbation for
        Semi-supervised Semantic Segmentation", CVPR 2024.

    Examples:
        >>> est = FlowDensityEstimator(dim=8, num_classes=3, hidden_dim=16, seed=0)
        >>> x = torch.randn(10, 8)
        >>> est.log_prob(x).shape, est.nll(x).shape
        (torch.Size([10]), torch.Size([]))
        >>> bool(torch.allclose(est.inverse(est(x)[0]), x, atol=1e-5))
        True
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_blocks: int = 2,
        hidden_dim: int = 256,
        clamp: float = 2.0,
        learn_means: bool = True,
        seed: int | None = None,
    ):
        super().__init__()
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.dim = int(dim)
        self.num_classes = int(num_classes)
        self.flow = build_glow_flow(dim, num_blocks, hidden_dim, clamp, generator)
        self.prior = GaussianMixturePrior(dim, num_classes, learn_means, generator)

    @property
    def means(self) -> torch.Tensor:
        """The mixture means ``(K, D)``."""
        return self.prior.means

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the parameters, in which the flow and the prior compute.

        Raises:
            ValueError: the parameters are not all float32 or all float64.
        """
        dtypes = {t.dtype for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()}
        if len(dtypes) == 1 and dtypes <= _COMPUTE_DTYPES:
            return dtypes.pop()
        found = ", ".join(sorted(str(dtype) for dtype in dtypes))
        raise ValueError(
            f"FlowDensityEstimator parameters are {found}; keep the estimator in float32 (or "
            "float64 for exact checks). For mixed precision run the segmenter under "
            "torch.autocast: the estimator computes in float32 inside it."
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map features to latents: returns ``z`` (layout of ``x``) and ``log|det dz/dx|`` (per row)."""
        check_features(x, "x", dim=self.dim)
        layout = RowLayout(x)
        z, log_det = self._to_latent(layout.to_rows(x))
        return layout.from_rows(z), layout.values_from_rows(log_det)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Map latents back to features (layout of ``z``)."""
        check_features(z, "z", dim=self.dim)
        layout = RowLayout(z)
        dtype = self.compute_dtype
        with autocast_off(z.device.type):
            x, _ = self.flow.inverse(layout.to_rows(z).to(dtype))
        return layout.from_rows(x)

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density of every row of ``x``, in float32 (float64 for a float64 estimator).

        Args:
            x: features.
            labels: optional long tensor with one entry per row: a class in ``[0, K)`` selects that
                class's component, ``-1`` the mixture. Anything else raises ValueError.
        """
        check_features(x, "x", dim=self.dim)
        layout = RowLayout(x)
        row_labels = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype not in _LABEL_DTYPES:
                raise ValueError(
                    "labels must be an integer torch.Tensor (class index, or -1 for unknown)"
                )
            if tuple(labels.shape) != layout.row_shape:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)}, expected {layout.row_shape} "
                    "(one label per feature row)"
                )
            row_labels = layout.values_to_rows(labels).long()
            check_labels(row_labels, self.num_classes)
        log_p = self.log_prob_rows(layout.to_rows(x), row_labels)
        return layout.values_from_rows(log_p)

    def nll(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-density (nats per row): the training loss."""
        return -self.log_prob(x, labels).mean()

    def bits_per_dim(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-density in bits per feature dimension: ``nll / (D ln 2)``."""
        return self.nll(x, labels) / (self.dim * math.log(2.0))

    def log_prob_rows(self, rows: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``log p`` of rows ``(N, D)`` without input checks: the one entry point for the library's
        own callers, which checked their inputs already (and must not synchronise with the device).

        ``labels``: ``(N,)`` long in ``[-1, K)``. The result is in :attr:`compute_dtype`, whatever
        the dtype of ``rows`` and the autocast state.
        """
        z, log_det = self._to_latent(rows)
        with autocast_off(rows.device.type):
            return self.prior.log_prob(z, labels) + log_det

    def _to_latent(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow on rows, in :attr:`compute_dtype` with autocast off: ``z (N, D)``, ``log_det (N,)``."""
        dtype = self.compute_dtype
        with autocast_off(rows.device.type):
            return self.flow(rows.to(dtype))


def check_estimator(estimator: object) -> FlowDensityEstimator:
    """Return ``estimator``, or raise ValueError if it is not a :class:`FlowDensityEstimator`."""
    if not isinstance(estimator, FlowDensityEstimator):
        raise ValueError(
            f"estimator must be a FlowDensityEstimator, got {type(estimator).__name__}"
        )
    return estimator


def check_labels(
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    sync_free: bool = False,
) -> None:
    """Raise ValueError unless every label is a class in ``[0, K)``, :data:`UNKNOWN_CLASS` or
    ``ignore_index`` (None: no label is ignored).

    With ``sync_free`` on CUDA the check is a device-side assertion, so the host never waits for
    the device; other devices have none and raise.
    """
    bad = (labels < UNKNOWN_CLASS) | (labels >= num_classes)
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    if sync_free and labels.device.type == "cuda":
        torch._assert_async(~bad.any(), "labels outside [-1, K) and not ignore_index")
        return
    if bool(bad.any()):
        choices = [f"a class in [0, {num_classes})", f"{UNKNOWN_CLASS} (unknown class)"]
        if ignore_index is not None:
            choices.append(f"ignore_index={ignore_index}")
        raise ValueError(
            f"label {int(labels[bad][0])} is out of range: expected "
            f"{', '.join(choices[:-1])} or {choices[-1]}"
        )
