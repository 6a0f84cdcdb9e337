"""Why the demo's mIoU stays low: can the model tell the digits apart at the demo's budget?

On the digit scenes a model must do two things: find the digits (foreground against background)
and name them (which of ten). This script measures the second at the budget of the README's main
job (300 iterations of 8 images on the CPU) with two learners on the same labelled scenes:

- ``segmenter``: the example loop itself, ``--mode supervised`` (MobileNetV2 DeepLabV3+, ImageNet
  weights, the loop's demo defaults), scored by its *foreground accuracy*: the share of digit
  pixels of the val split given their own digit. These are the study's own runs
  (``benchmarks.ssl_demo`` with ``--methods supervised``), so the 60-label runs are reused when
  that study already made them. The same final model is also scored on scenes it trained on
  (its labelled scenes, at most the first 300, whole and unaugmented); a score there far above
  the val score means it memorised the scenes it saw rather than learnt the digits' shapes.
- ``classifier``: the same ImageNet MobileNetV2 as an image classifier (a new 10-way last layer)
  trained on the digits *cut out* of the same labelled scenes (the bounding box of each digit's
  mask, resized to 64 x 64; no augmentation), batch 8, SGD with the loop's momentum, weight decay
  and poly schedule at lr 1e-3, for as many steps; scored by its accuracy on the digits cut out of
  the val scenes. It sees at most as many digits as the segmenter (one per image, not one to
  three).

Chance is 10 % for both. A classifier far above chance shows that the ImageNet features carry the
digit's identity and that the scenes' labels are learnable at this budget from this many labels;
a segmenter near chance then locates the demo's limit in naming every pixel from its local
features, which needs more iterations than a short CPU run gives. Writes
``benchmarks/results/digit_identity.json``.

    python -m benchmarks.digit_identity                       # 60 and 2400 labels, seeds 0 1 2
    python -m benchmarks.digit_identity --quick               # tiny data, seconds: checks it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from benchmarks.common import write_results  # noqa: E402
from benchmarks.ssl_demo import (  # noqa: E402
    DEFAULT_RUNS_DIR,
    QUICK_BUDGET,
    StudyBudget,
    run_dir,
    run_one,
)

__all__ = [
    "digit_crops",
    "main",
    "parse_args",
    "seen_scene_foreground_accuracy",
    "train_crop_classifier",
]

CROP = 64
MIN_DIGIT_PIXELS = 30
SEEN_SCENES = 300


def digit_crops(
    root: Path, lines: Sequence[str], size: int = CROP, min_pixels: int = MIN_DIGIT_PIXELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every digit out of the scenes in ``lines``: its mask's bounding box, resized.

    Args:
        root: the demo dataset folder.
        lines: split lines (``JPEGImages/x.jpg SegmentationClass/x.png``).
        size: side of the returned crops.
        min_pixels: digits covering fewer visible pixels (mostly hidden by later ones) are skipped.

    Shape:
        - images: ``(N, 3, size, size)`` float, ImageNet-normalised.
        - digits: ``(N,)`` long in ``0..9``.

    Returns:
        ``(images, digits)``.
    """
    from ddfp_examples.transforms import IMAGENET_MEAN, IMAGENET_STD
    from PIL import Image

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    images, digits = [], []
    for line in lines:
        image_path, mask_path = line.split()
        image = Image.open(root / image_path).convert("RGB")
        mask = np.asarray(Image.open(root / mask_path))
        for label in np.unique(mask):
            if label == 0 or label == 255:
                continue
            ys, xs = np.nonzero(mask == label)
            if len(ys) < min_pixels:
                continue
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            crop = np.asarray(image.crop(box).resize((size, size), Image.Resampling.BILINEAR))
            tensor = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255.0
            images.append((tensor - mean) / std)
            digits.append(int(label) - 1)
    if not images:
        raise ValueError(f"no digit covers {min_pixels} pixels in the {len(lines)} scenes given")
    return torch.stack(images), torch.tensor(digits)


def _accuracy(model: nn.Module, images: torch.Tensor, digits: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(digits), 64):
            logits = model(images[start : start + 64])
            correct += int((logits.argmax(1) == digits[start : start + 64]).sum())
    return correct / len(digits)


def train_crop_classifier(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weights: Path | None,
) -> float:
    """Fine-tune ImageNet MobileNetV2 with a new 10-way layer on digit crops; val accuracy.

    Args:
        train: ``(images, digits)`` to train on.
        val: ``(images, digits)`` to score.
        steps: SGD steps (momentum 0.9, weight decay 1e-4, poly schedule with power 0.9).
        batch_size: crops per step, drawn with replacement.
        lr: initial learning rate of every parameter.
        seed: seeds the new layer and the draws.
        weights: torchvision's ImageNet MobileNetV2 file; ``None`` trains from random init.

    Returns:
        Accuracy on ``val`` after the last step.
    """
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2(weights=None)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.classifier[-1] = nn.Linear(model.last_channel, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    images, digits = train
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / steps) ** 0.9
        index = torch.randint(len(digits), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(images[index]), digits[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return _accuracy(model, *val)


def seen_scene_foreground_accuracy(run: Path, root: Path, lines: Sequence[str]) -> float:
    """Foreground accuracy of a finished loop run's final model on scenes it trained on.

    Args:
        run: the run's output folder (its ``latest.pt`` holds the final model and the loop's args).
        root: the demo dataset folder.
        lines: split lines of labelled scenes of that run, scored whole at their own size.

    Returns:
        Share of the digit pixels of ``lines`` predicted as their own digit.
    """
    from ddfp_examples.datasets import SemiSegDataset
    from ddfp_examples.demo_data import DEMO_CLASSES
    from ddfp_examples.metrics import evaluate
    from ddfp_examples.models import build_deeplabv3plus

    checkpoint = torch.load(Path(run) / "latest.pt", map_location="cpu", weights_only=False)
    loop_args = checkpoint["args"]
    num_classes = len(DEMO_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init warning: the weights come from the run
        model = build_deeplabv3plus(
            loop_args["backbone"], num_classes, aspp_dilations=loop_args.get("aspp_dilations")
        )
    model.load_state_dict(checkpoint["model"])
    dataset = SemiSegDataset(root, list(lines), "val", crop_size=None, num_classes=num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1)
    with torch.no_grad():
        meter = evaluate(model, loader, num_classes, torch.device("cpu"))
    return meter.foreground_accuracy(0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--num-labeled", type=int, nargs="+", default=[60, 2400])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classifier-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--data-root", type=Path, default=None, help="default: the loop's cache")
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="segmenter runs (default: the ssl_demo study's, so its runs are reused)",
    )
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="tiny generated demo, 2 steps: checks that it runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_labeled, args.seeds = [8], [0]
        args.runs_dir = args.runs_dir or DEFAULT_RUNS_DIR.parent / "digit_identity_quick"
    args.runs_dir = args.runs_dir or DEFAULT_RUNS_DIR / "reported"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or read back) both learners for every size and seed; write the JSON; return it."""
    from ddfp_examples.backbones import find_mobilenet_v2_weights
    from ddfp_examples.datasets import draw_labeled_split, read_split_file
    from ddfp_examples.demo_data import default_demo_root, make_demo_dataset

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        budget = dataclasses.replace(QUICK_BUDGET, threads=args.threads)
        data_root = args.data_root or args.runs_dir / "demo_data"
    else:
        budget = StudyBudget(threads=args.threads)
        data_root = args.data_root or default_demo_root()
    data_root = make_demo_dataset(data_root, budget.demo_size[0], budget.demo_size[1])
    steps = budget.epochs * budget.iters_per_epoch
    train_lines = read_split_file(data_root / "splits" / "train.txt")
    val = digit_crops(data_root, read_split_file(data_root / "splits" / "val.txt"))
    weights = find_mobilenet_v2_weights()

    runs: list[dict[str, Any]] = []
    start = time.time()
    for size in args.num_labeled:
        for seed in args.seeds:
            segmenter = run_one("supervised", size, seed, args.runs_dir, budget, data_root)
            labelled, _ = draw_labeled_split(train_lines, size, seed)
            seen = seen_scene_foreground_accuracy(
                run_dir(args.runs_dir, "supervised", size, seed), data_root, labelled[:SEEN_SCENES]
            )
            crops = digit_crops(data_root, labelled)
            accuracy = train_crop_classifier(
                crops, val, steps, budget.batch_size, args.classifier_lr, seed, weights
            )
            runs.append(
                {
                    "num_labeled": size,
                    "seed": seed,
                    "segmenter_foreground_accuracy": segmenter["final_scores"][
                        "foreground accuracy"
                    ],
                    "segmenter_miou": segmenter["final_miou"],
                    "segmenter_seen_foreground_accuracy": seen,
                    "segmenter_seen_scenes": min(size, SEEN_SCENES),
                    "classifier_accuracy": accuracy,
                    "classifier_train_digits": len(crops[1]),
                }
            )
            print(
                f"n={size} seed={seed}: segmenter foreground accuracy "
                f"{100 * runs[-1]['segmenter_foreground_accuracy']:.1f} % "
                f"({100 * seen:.1f} % on its own labelled scenes), classifier "
                f"{100 * accuracy:.1f} % ({time.time() - start:.0f} s so far)",
                flush=True,
            )

    table = []
    for size in args.num_labeled:
        rows = [run for run in runs if run["num_labeled"] == size]
        entry: dict[str, Any] = {"num_labeled": size}
        for key in (
            "segmenter_foreground_accuracy",
            "segmenter_seen_foreground_accuracy",
            "classifier_accuracy",
        ):
            values = [row[key] for row in rows]
            entry[key] = values
            entry[f"mean_{key}"] = statistics.fmean(values)
        table.append(entry)
    results = {
        "setup": {
            "iterations": steps,
            "batch_size": budget.batch_size,
            "classifier_lr": args.classifier_lr,
            "crop": CROP,
            "val_digits": len(val[1]),
            "backbone_weights": weights is not None,
            "chance": 0.1,
            "data_root": str(data_root),
            "segmenter_runs": str(args.runs_dir),
            "seen_scenes": SEEN_SCENES,
        },
        "runs": runs,
        "table": table,
    }
    name = "digit_identity_quick" if args.quick else "digit_identity"
    path = write_results(name, results, args.results_dir)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
