"""What one run of the example loop trains: the segmenter, its optimiser and the DDFP stream.

The loop itself (``examples/voc_unimatch_plus_ddfp.py``) reads these as typed objects:
:class:`TrainingState` holds the optimiser, the gradient scaler, the consistency loss and, when the
run perturbs features with DDFP (or a primitive in DDFP's place), its :class:`DensityStream`.
"""

from __future__ import annotations

__all__ = [
    "DensityStream",
    "MeanTeacher",
    "TrainingState",
    "build_density_stream",
    "build_model",
    "build_optimizer",
    "build_training_state",
    "density_fp",
    "set_poly_lr",
    "wrap_distributed",
]

import argparse
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddfp_lib import (
    ConsistencyLoss,
    DensityDescendingPerturbation,
    FlowDensityEstimator,
    OnlineFlowTrainer,
    build_perturbation,
)

from .datasets import DatasetSpec
from .models import DeepLabV3Plus, build_deeplabv3plus
from .runtime import DistributedContext, amp_dtype, ddp_device_ids, grad_scaler
from .transforms import IGNORE_INDEX


@dataclass
class DensityStream:
    """The DDFP stream: the perturbation of the weak view's decoder input, and the flow behind it.

    Attributes:
        perturbation: called as ``perturbation(v, head=head, mask=confident)``.
        head: maps the decoder input to the perturbation's space (the fuse block for DDFP, fuse
            block + classifier for VAT); ``None`` for primitives that need none.
        estimator: the flow whose density DDFP descends (``None`` for other primitives).
        flow_trainer: its online trainer, stepped once per iteration.
    """

    perturbation: nn.Module
    head: nn.Module | None = None
    estimator: FlowDensityEstimator | None = None
    flow_trainer: OnlineFlowTrainer | None = None


class MeanTeacher:
    """An exponential moving average of the model that supplies pseudo-labels (mean teacher).

    At its ``t``-th update (``t = 0, 1, ...``) every parameter becomes
    ``d * teacher + (1 - d) * student`` with ``d = min(1 - 1 / (t + 1), decay)``, so it is the
    running mean of the student's weights until ``1 / (1 - decay)`` updates, then an EMA; buffers
    (BatchNorm statistics) are copied. It starts from the student as it is at the first
    semi-supervised step (:meth:`start`), not from the untrained model, as the reference DDFP
    loop does after its supervised warm-up.

    References:
        Tarvainen and Valpola, "Mean teachers are better role models", NeurIPS 2017.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.steps = 0

    def start(self, student: nn.Module) -> None:
        """Before the first update: become a copy of ``student``."""
        if self.steps == 0:
            self.model.load_state_dict(student.state_dict())

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Move towards ``student`` after one of its optimiser steps."""
        decay = min(1.0 - 1.0 / (self.steps + 1), self.decay)
        for mine, theirs in zip(self.model.parameters(), student.parameters()):
            mine.mul_(decay).add_(theirs.detach(), alpha=1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), student.buffers()):
            mine.copy_(theirs)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.steps, self.decay = int(state["steps"]), float(state["decay"])


@dataclass
class TrainingState:
    """Everything an iteration updates besides the model, and what it needs to compute its loss."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    consistency: ConsistencyLoss
    ddfp: DensityStream | None = None
    teacher: MeanTeacher | None = None

    @property
    def estimator(self) -> FlowDensityEstimator | None:
        return None if self.ddfp is None else self.ddfp.estimator

    @property
    def flow_trainer(self) -> OnlineFlowTrainer | None:
        return None if self.ddfp is None else self.ddfp.flow_trainer


def density_fp(args: argparse.Namespace) -> bool:
    """Whether the run has a DDFP stream (``--fp ddfp`` or ``both``; never in supervised mode)."""
    return args.fp in ("ddfp", "both")


def find_backbone_weights(args: argparse.Namespace) -> Path | None:
    if args.backbone_weights is not None:
        return args.backbone_weights
    if args.backbone == "mobilenet_v2":
        from .backbones import find_mobilenet_v2_weights

        return find_mobilenet_v2_weights()
    return None


def build_model(
    args: argparse.Namespace, num_classes: int, ctx: DistributedContext
) -> DeepLabV3Plus:
    """DeepLabV3+ on ``args.backbone`` with its local ImageNet weights when they can be found."""
    weights = find_backbone_weights(args)
    if weights is None and ctx.is_main:
        print(f"[ddfp] no backbone weights for {args.backbone}: random init, results will be poor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_deeplabv3plus(
            args.backbone,
            num_classes,
            backbone_weights=weights,
            output_stride=args.output_stride,
            aspp_dilations=args.aspp_dilations,
            head_channels=args.head_channels,
            low_reduced=args.low_reduced,
            head_dropout=args.head_dropout,
        )


def build_density_stream(
    args: argparse.Namespace,
    model: DeepLabV3Plus,
    spec: DatasetSpec,
    total_iters: int,
    device: torch.device,
) -> DensityStream:
    """DDFP with its flow and online trainer, or ``--perturbation``'s primitive in DDFP's place
    (e.g. ``random_direction``: DDFP's step size without the density)."""
    if args.perturbation == "ddfp":
        estimator = FlowDensityEstimator(
            model.classifier.in_channels,
            spec.num_classes,
            hidden_dim=args.flow_hidden,
            seed=args.seed,
        ).to(device)
        return DensityStream(
            perturbation=DensityDescendingPerturbation(
                estimator,
                eps=args.eps,
                head_mode=args.ddfp_head_mode,
                min_grad_ratio=args.ddfp_min_grad_ratio,
            ),
            head=model.head,
            estimator=estimator,
            flow_trainer=OnlineFlowTrainer(
                estimator, lr=args.flow_lr, max_samples=args.flow_samples, total_steps=total_iters
            ),
        )
    options = {"eps": args.eps} if args.perturbation in ("random_direction", "vat") else {}
    perturbation = build_perturbation(args.perturbation, **options)
    # VAT's KL compares class predictions, so its head runs up to the classifier.
    head = nn.Sequential(model.head, model.classifier) if args.perturbation == "vat" else None
    return DensityStream(perturbation=perturbation, head=head)


def build_optimizer(model: DeepLabV3Plus, args: argparse.Namespace) -> torch.optim.Optimizer:
    groups = [
        {"params": list(model.backbone_parameters()), "lr": args.lr},
        {"params": list(model.decoder_parameters()), "lr": args.lr * args.head_lr_mult},
    ]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(
        groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )


def build_training_state(
    args: argparse.Namespace,
    model: DeepLabV3Plus,
    spec: DatasetSpec,
    total_iters: int,
    device: torch.device,
) -> TrainingState:
    """Optimiser, gradient scaler, consistency loss, the DDFP stream (with ``--fp ddfp`` or
    ``both``) and the mean teacher (with ``--ema``)."""
    return TrainingState(
        optimizer=build_optimizer(model, args),
        scaler=grad_scaler(args.amp, device),
        amp_dtype=amp_dtype(args.amp, device),
        consistency=ConsistencyLoss(threshold=args.threshold, ignore_index=IGNORE_INDEX),
        ddfp=(
            build_density_stream(args, model, spec, total_iters, device)
            if density_fp(args)
            else None
        ),
        teacher=MeanTeacher(model, args.ema_decay) if args.ema and args.mode == "semi" else None,
    )


def wrap_distributed(
    streams: nn.Module, args: argparse.Namespace, ctx: DistributedContext
) -> DistributedDataParallel:
    """DDP around the module of the iteration's forward passes.

    DDP must be told to look for unused parameters when some iteration leaves one without a
    gradient: the auxiliary BatchNorm gets one only from the DDFP stream, so it idles in every
    iteration without it (no DDFP stream, warm-up epochs, flow burn-in). Searching costs a walk of
    the autograd graph per iteration, so it is switched on only then.
    """
    held_back = args.warmup_epochs > 0 or args.flow_burn_in > 0
    aux_bn_idles = args.aux_bn and (not density_fp(args) or held_back)
    return DistributedDataParallel(
        streams,
        device_ids=ddp_device_ids(ctx.device),
        find_unused_parameters=aux_bn_idles,
    )


def set_poly_lr(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, iteration: int, total: int
) -> float:
    """Linear warm-up over ``--lr-warmup-iters``, then poly decay with power 0.9."""
    warmup = min(args.lr_warmup_iters, total - 1)
    if iteration < warmup:
        lr = args.lr * (iteration + 1) / (warmup + 1)
    else:
        lr = args.lr * (1 - (iteration - warmup) / (total - warmup)) ** 0.9
    optimizer.param_groups[0]["lr"] = lr
    optimizer.param_groups[1]["lr"] = lr * args.head_lr_mult
    return lr
