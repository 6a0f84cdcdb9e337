"""Online training of a FlowDensityEstimator inside a segmentation loop.

Each call of :meth:`OnlineFlowTrainer.step` takes the detached features of the current batch, labels
the labelled pixels with their ground-truth class and the rest with the unknown class, draws at most
``max_samples`` of them, jitters them with Gaussian noise and takes one Adam step on their NLL. A
batch without a single valid pixel takes no step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._checks import autocast_off, check_finite, check_positive
from .density import UNKNOWN_CLASS, FlowDensityEstimator, check_estimator, check_labels
from .losses import IGNORE_INDEX

__all__ = ["OnlineFlowTrainer", "feature_rows_and_labels"]

#: Devices on which Adam runs with ``capturable=True`` (its step counts live on the device).
CAPTURABLE_DEVICES = ("cuda", "xpu", "hpu")

Features = Union[torch.Tensor, Sequence[torch.Tensor]]
Labels = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


def feature_rows_and_labels(
    features: torch.Tensor,
    labels: torch.Tensor | None,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    sync_free: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten a feature map to rows with per-row labels and a validity flag.

    Labels are resized to the feature resolution with nearest-neighbour sampling. A label in
    ``[0, K)`` keeps its class, ``-1`` is the unknown class, ``ignore_index`` marks pixels to drop;
    ``labels=None`` makes every pixel unknown.

    Args:
        features: feature map.
        labels: label map at any resolution, or None.
        num_classes: K.
        ignore_index: label of pixels that are left out.
        sync_free: on CUDA, check label values with a device-side assertion instead of raising on
            the host (other devices have none and raise).

    Shape:
        - features: ``(B, D, h, w)``; labels: ``(B, H, W)``
        - returns rows ``(B*h*w, D)``, row labels ``(B*h*w,)`` in ``[-1, K)``, valid ``(B*h*w,)`` bool
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D, h, w), got shape {tuple(features.shape)}")
    b, _, h, w = features.shape
    rows = rearrange(features, "b d h w -> (b h w) d")
    if labels is None:
        row_labels = torch.full((b * h * w,), UNKNOWN_CLASS, dtype=torch.long, device=rows.device)
        return rows, row_labels, torch.ones_like(row_labels, dtype=torch.bool)
    if labels.dim() != 3 or labels.shape[0] != b:
        raise ValueError(
            f"labels must be (B, H, W) with B={b} to match the features, got {tuple(labels.shape)}"
        )
    if labels.shape[-2:] != (h, w):
        labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    row_labels = labels.reshape(-1).long().to(rows.device)
    check_labels(row_labels, num_classes, ignore_index, sync_free)
    valid = row_labels != ignore_index
    row_labels = torch.where(valid, row_labels, torch.full_like(row_labels, UNKNOWN_CLASS))
    return rows, row_labels, valid


class OnlineFlowTrainer:
    """One Adam step of the flow's NLL per segmentation iteration, on a sample of the batch's features.

    A batch without a valid pixel (everything ignored) takes no step: the flow, Adam's moments and
    step counts and the learning-rate schedule stay as they were. ``num_steps`` counts the calls of
    :meth:`step`, ``steps_taken`` (a tensor on the flow's device, read without forcing a
    synchronisation) the steps taken; the decision is made on the device.

    Args:
        estimator: the FlowDensityEstimator to train (float32; float64 for exact checks).
        lr: Adam learning rate.
        betas: Adam betas.
        max_samples: at most this many feature rows enter one step (uniformly drawn among valid rows).
        noise_std: standard deviation of the Gaussian jitter added to the sampled features.
        grad_clip: max total gradient norm; None disables clipping.
        total_steps: length of training in steps; the learning rate then decays exponentially
            to ``final_lr_factor * lr``. None keeps it constant. Only steps that are taken count
            (a batch without a valid pixel takes none).
        final_lr_factor: the learning-rate factor reached at ``total_steps``.
        ignore_index: label value of pixels left out (padding, void).
        sync_gradients: average gradients over the ranks of an initialised torch.distributed group
            (and broadcast rank 0's weights once), so that every rank keeps an identical flow.
            "auto" does so whenever a group with more than one rank is initialised.

    Shape:
        - features: ``(B, D, h, w)`` per map, ``D = estimator.dim``
        - labels: ``(B, H, W)`` per map, any resolution (resized with nearest-neighbour sampling)

    References:
        Wang et al., "Towards the Uncharted: Density-Descending Feature Perturbation for
        Semi-supervised Semantic Segmentation", CVPR 2024.

    Examples:
        >>> features = torch.randn(2, 4, 5, 5)
        >>> labels = torch.randint(0, 2, (2, 20, 20))
        >>> est = FlowDensityEstimator(dim=4, num_classes=2, hidden_dim=8, seed=0)
        >>> trainer = OnlineFlowTrainer(est, total_steps=100)
        >>> loss = trainer.step(features, labels)
        >>> loss.shape, trainer.num_steps
        (torch.Size([]), 1)
    """

    def __init__(
        self,
        estimator: FlowDensityEstimator,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.9),
        max_samples: int = 20480,
        noise_std: float = 0.05,
        grad_clip: float | None = 50.0,
        total_steps: int | None = None,
        final_lr_factor: float = 0.01,
        ignore_index: int = IGNORE_INDEX,
        sync_gradients: bool | str = "auto",
    ):
        check_estimator(estimator)
        check_positive(lr, "lr")
        if int(max_samples) < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if grad_clip is not None:
            check_positive(grad_clip, "grad_clip")
        if total_steps is not None and int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {total_steps}")
        check_positive(final_lr_factor, "final_lr_factor")
        self.estimator = estimator
        self.max_samples = int(max_samples)
        self.noise_std = float(noise_std)
        self.grad_clip = grad_clip
        self.total_steps = total_steps
        self.final_lr_factor = float(final_lr_factor)
        self.ignore_index = ignore_index
        self.base_lr = float(lr)
        device = next(estimator.parameters()).device
        # Capturable Adam keeps its step counts on the device, so a skipped step can restore them
        # there without the host reading anything.
        self.optimizer = torch.optim.Adam(
            estimator.parameters(),
            lr=self.base_lr,
            betas=betas,
            capturable=device.type in CAPTURABLE_DEVICES,
        )
        self.num_steps = 0
        self.steps_taken = torch.zeros((), dtype=torch.long, device=device)
        self._distributed = self._resolve_distributed(sync_gradients)
        if self._distributed:
            self._broadcast_parameters()

    @property
    def lr(self) -> torch.Tensor:
        """The learning rate of the next step that is taken (0-dim tensor on the flow's device)."""
        return self.base_lr * self._lr_factor(self.steps_taken)

    def _lr_factor(self, steps: torch.Tensor) -> torch.Tensor:
        if self.total_steps is None:
            return torch.ones((), dtype=torch.float32, device=steps.device)
        progress = (steps.float() / self.total_steps).clamp(max=1.0)
        return torch.exp(math.log(self.final_lr_factor) * progress)

    @staticmethod
    def _resolve_distributed(sync_gradients: bool | str) -> bool:
        dist = torch.distributed
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if sync_gradients == "auto":
            return active
        if sync_gradients and not active:
            raise ValueError("sync_gradients=True needs an initialised torch.distributed group")
        return bool(sync_gradients)

    def _broadcast_parameters(self) -> None:
        with torch.no_grad():
            for tensor in list(self.estimator.parameters()) + list(self.estimator.buffers()):
                torch.distributed.broadcast(tensor, src=0)

    def _average_gradients(self, has_rows: torch.Tensor) -> torch.Tensor:
        """Average the gradients over the ranks; return whether any rank had a valid row."""
        world = torch.distributed.get_world_size()
        for p in self.estimator.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)
        any_rows = has_rows.to(torch.float32)
        torch.distributed.all_reduce(any_rows)
        return any_rows > 0

    def sample(
        self, features: Features, labels: Labels = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw the rows of one step: returns rows ``(M, D)``, labels ``(M,)``, weights ``(M,)``.

        ``M = min(max_samples, total rows)``. Rows are drawn uniformly among the valid rows with a
        fixed-size top-k of random keys, so nothing depends on the data on the host; when fewer
        valid rows exist than ``M``, the extra rows get weight 0.
        """
        feature_list = [features] if isinstance(features, torch.Tensor) else list(features)
        if labels is None or isinstance(labels, torch.Tensor):
            label_list = [labels] + [None] * (len(feature_list) - 1)
        else:
            label_list = list(labels)
        if len(label_list) != len(feature_list):
            raise ValueError(
                f"got {len(feature_list)} feature maps but {len(label_list)} label maps"
            )
        pieces = [
            feature_rows_and_labels(
                f.detach(), y, self.estimator.num_classes, self.ignore_index, sync_free=True
            )
            for f, y in zip(feature_list, label_list)
        ]
        rows = torch.cat([p[0] for p in pieces]).to(self.estimator.compute_dtype)
        row_labels = torch.cat([p[1] for p in pieces])
        valid = torch.cat([p[2] for p in pieces])
        if rows.shape[1] != self.estimator.dim:
            raise ValueError(
                f"features have {rows.shape[1]} channels, the estimator expects {self.estimator.dim}"
            )
        count = min(self.max_samples, rows.shape[0])
        keys = torch.rand(rows.shape[0], device=rows.device)
        keys = torch.where(valid, keys, torch.full_like(keys, -1.0))
        index = torch.topk(keys, count, sorted=False).indices
        return rows[index], row_labels[index], valid[index].float()

    def step(self, features: Features, labels: Labels = None) -> torch.Tensor:
        """One optimisation step of the flow.

        Args:
            features: a feature map, or a sequence of them (e.g. labelled and unlabelled batches).
                Detached here; gradients never reach the segmenter.
            labels: matching label maps (any resolution, resized with nearest): class indices,
                ``-1`` for unknown, ``ignore_index`` to drop. None (or a None entry) = all unknown.

        Shape:
            - features: ``(B, D, h, w)`` each; labels: ``(B, H, W)`` each

        Returns:
            The weighted mean NLL of the sampled rows before the step, a detached 0-dim tensor
            (no host synchronisation).
        """
        rows, row_labels, weights = self.sample(features, labels)
        check_finite(rows, "features", sync_free=True)
        self.estimator.train()
        device_type = rows.device.type
        with autocast_off(device_type), torch.enable_grad():
            if self.noise_std > 0:
                rows = rows + self.noise_std * torch.randn_like(rows)
            log_p = self.estimator.log_prob_rows(rows, row_labels)
            loss = -(log_p * weights).sum() / weights.sum().clamp_min(1.0)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        has_rows = weights.sum() > 0
        if self._distributed:
            has_rows = self._average_gradients(has_rows)
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.estimator.parameters(), self.grad_clip)
        self._step_or_skip(has_rows)
        self.num_steps += 1
        return loss.detach()

    def _step_or_skip(self, has_rows: torch.Tensor) -> None:
        """One Adam step scaled by the schedule, or none at all when ``has_rows`` is False.

        Adam's update is linear in the learning rate, so the step is taken at the base rate and the
        parameters move by the schedule's fraction of it (0 to skip); the moments and step counts
        are put back when skipping. Everything is decided on the device: no host synchronisation.
        """
        params = [p for p in self.estimator.parameters() if p.grad is not None]
        before = [p.detach().clone() for p in params]
        state_before = [
            {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
            for p in params
        ]
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr
        self.optimizer.step()
        fraction = torch.where(has_rows, self._lr_factor(self.steps_taken), 0.0)
        with torch.no_grad():
            for p, old, old_state in zip(params, before, state_before):
                p.copy_(torch.where(has_rows, old + fraction.to(p.dtype) * (p - old), old))
                for key, value in self.optimizer.state[p].items():
                    if torch.is_tensor(value):
                        previous = old_state.get(key, torch.zeros_like(value))
                        value.copy_(torch.where(has_rows.to(value.device), value, previous))
        self.steps_taken += has_rows.long()

    def state_dict(self) -> dict:
        """Optimiser, step counts (the estimator's weights live in its own state dict)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "num_steps": self.num_steps,
            "steps_taken": self.steps_taken.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (also the older form with a ``scheduler`` entry,
        from before skipped steps existed, where every call was a step)."""
        capturable = [group["capturable"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, flag in zip(self.optimizer.param_groups, capturable):
            group["capturable"] = flag
            group["lr"] = self.base_lr
            for p in group["params"]:
                step = self.optimizer.state.get(p, {}).get("step")
                if step is not None and flag:
                    self.optimizer.state[p]["step"] = step.to(p.device, torch.float32)
        self.num_steps = int(state["num_steps"])
        taken = state.get("steps_taken", self.num_steps)
        self.steps_taken = torch.as_tensor(taken, dtype=torch.long).to(self.steps_taken.device)
