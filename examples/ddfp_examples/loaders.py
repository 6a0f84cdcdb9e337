"""The example loop's data: split lines of a run, and its labelled, unlabelled and val loaders."""

from __future__ import annotations

__all__ = ["build_loaders", "dataset_lines", "steps_per_epoch"]

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .datasets import (
    SemiSegDataset,
    check_no_validation_images,
    draw_labeled_split,
    read_split_file,
    scan_cityscapes_layout,
    scan_voc_layout,
    without_validation_images,
)
from .options import run_spec
from .runtime import DistributedContext, EpochSampler, SeededItems, pin_memory


def dataset_lines(
    args: argparse.Namespace, ctx: DistributedContext
) -> tuple[Path, list, list, list]:
    """Labelled, unlabelled and validation split lines, and the root they are relative to."""
    if args.dataset == "demo":
        from .demo_data import default_demo_root, make_demo_dataset

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


def build_loaders(
    args: argparse.Namespace, ctx: DistributedContext
) -> tuple[dict[str, DataLoader], DataLoader, dict[str, int]]:
    """Loaders of the labelled stream ``x``, the unlabelled ``u`` and its CutMix partner ``u_mix``
    (absent when every image is labelled), the val loader, and the number of images of each."""
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


def steps_per_epoch(loaders: dict[str, DataLoader], args: argparse.Namespace) -> int:
    """Iterations of an epoch: one pass over the unlabelled set (UniMatch), the labelled stream
    repeated to that length; in supervised mode one pass over the labelled loader (as long, or a
    pass over the labelled images when they outnumber the unlabelled ones). With
    ``--accumulate N`` an iteration is one optimiser step over N batches; ``--iters-per-epoch``
    caps it."""
    batches = len(loaders["x"] if args.mode == "supervised" else loaders["u"])
    steps = batches // args.accumulate
    steps = min(steps, args.iters_per_epoch or steps)
    if steps < 1:
        raise ValueError("fewer training images than one batch: lower --batch-size")
    return steps
