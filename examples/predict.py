"""Segment a folder of images with a checkpoint of examples/voc_unimatch_plus_ddfp.py.

Every image ``<name>.<ext>`` becomes ``<out>/<name>.png``: a palette PNG whose pixel values are the
predicted class indices, coloured with the Pascal VOC palette (the format of VOC's own masks, so the
files open as masks in any VOC tool). The flow of a DDFP run is not needed: it is used in training
only.

    python examples/predict.py runs/unimatch_ddfp/best.pt path/to/images --out predictions
    python examples/predict.py best.pt images --mode sliding --window 801   # Cityscapes-sized images

Checkpoints are Python pickles: load only files you trust.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddfp_examples.datasets import CUSTOM, DATASETS, DatasetSpec, spec_from_run_args  # noqa: E402
from ddfp_examples.models import DeepLabV3Plus, build_deeplabv3plus  # noqa: E402
from ddfp_examples.runtime import DEVICES, select_device  # noqa: E402
from ddfp_examples.transforms import voc_palette  # noqa: E402

from ddfp_lib import FlowDensityEstimator  # noqa: E402

__all__ = [
    "IMAGE_SUFFIXES",
    "TrainedModel",
    "find_images",
    "load_trained_model",
    "main",
    "predict_image",
    "predict_folder",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class TrainedModel(NamedTuple):
    """What a checkpoint of the example loop holds, rebuilt.

    Attributes:
        model: the DeepLabV3+ in eval mode.
        estimator: the flow of a DDFP run in eval mode, or None when the run had no DDFP stream.
        args: the loop's arguments, as saved (``dataset``, ``backbone``, ``crop_size``, ``eps``, ...).
        spec: the dataset's :class:`~ddfp_examples.datasets.DatasetSpec`.
    """

    model: DeepLabV3Plus
    estimator: FlowDensityEstimator | None
    args: dict[str, Any]
    spec: DatasetSpec


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model (and the flow, if any) of a checkpoint written by the example loop.

    Args:
        path: ``best.pt`` or ``latest.pt`` of a run: a dict with ``"model"`` (the DeepLabV3+
            state dict), ``"args"`` (the loop's arguments) and, for a DDFP run, ``"flow"``.
        device: where to put the model.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint of the loop.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or not {"model", "args"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a checkpoint of voc_unimatch_plus_ddfp.py: expected the keys 'model' "
            f"and 'args', found {found}"
        )
    args = dict(checkpoint["args"])
    if args.get("dataset") not in (*DATASETS, CUSTOM):
        raise ValueError(
            f"{path}: unknown dataset {args.get('dataset')!r}; expected one of "
            f"{[*sorted(DATASETS), CUSTOM]}"
        )
    spec = spec_from_run_args(args)
    with warnings.catch_warnings():
        # The backbone is left random on purpose: the checkpoint overwrites every weight.
        warnings.simplefilter("ignore")
        model = build_deeplabv3plus(
            args["backbone"],
            spec.num_classes,
            output_stride=args.get("output_stride"),
            aspp_dilations=args.get("aspp_dilations"),
            head_channels=args.get("head_channels") or 256,
            low_reduced=args.get("low_reduced") or 48,
            head_dropout=args.get("head_dropout", 0.1),
        )
    if args.get("aux_bn"):
        from ddfp_lib import convert_to_dual_bn

        convert_to_dual_bn(model.head)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    estimator = None
    if "flow" in checkpoint:
        estimator = FlowDensityEstimator(
            model.classifier.in_channels,
            spec.num_classes,
            hidden_dim=args.get("flow_hidden") or 256,
        )
        estimator.load_state_dict(checkpoint["flow"])
        estimator.to(device).eval()
    return TrainedModel(model, estimator, args, spec)


@torch.no_grad()
def predict_image(
    model: nn.Module,
    image: torch.Tensor,
    num_classes: int,
    mode: str = "full",
    window: int = 321,
) -> torch.Tensor:
    """Class scores of one normalised image, full-image or with crop-sized sliding windows.

    Args:
        model: maps ``(B, 3, H, W)`` images to ``(B, K, H, W)`` logits.
        image: an image normalised like the training data (see ``ddfp_examples.transforms.normalize``).
        num_classes: K.
        mode: "full" or "sliding" (windows of side ``window``, stride ``2/3`` of it, averaged).
        window: side of a sliding window.

    Shape:
        - image: ``(3, H, W)``
        - returns: ``(K, H, W)`` float32 logits
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    batch = image[None]
    if mode == "full":
        logits = model(batch)
    elif mode == "sliding":
        from ddfp_examples.metrics import sliding_window_logits

        logits = sliding_window_logits(model, batch, num_classes, window, max(1, window * 2 // 3))
    else:
        raise ValueError(f"mode must be 'full' or 'sliding', got {mode!r}")
    return logits[0].float()


def find_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder`` (by suffix), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return images


def predict_folder(
    trained: TrainedModel,
    folder: str | Path,
    out: str | Path,
    mode: str | None = None,
    window: int | None = None,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """Write one palette PNG of predicted classes per image of ``folder`` into ``out``.

    Args:
        trained: the output of :func:`load_trained_model`.
        folder: the images (``IMAGE_SUFFIXES``; any size, converted to RGB).
        out: destination folder, created if needed.
        mode: "full" or "sliding"; None uses the dataset's evaluation mode.
        window: sliding-window side; None uses the training crop size.
        device: where the model runs.

    Returns:
        The written paths, in the order of the images.
    """
    from ddfp_examples.transforms import normalize
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mode = mode or trained.spec.eval_mode
    window = window or int(trained.args.get("crop_size") or trained.spec.crop_size)
    palette = voc_palette()
    written = []
    for path in find_images(folder):
        with Image.open(path) as opened:
            image = normalize(opened.convert("RGB"))
        logits = predict_image(
            trained.model, image.to(device), trained.spec.num_classes, mode, window
        )
        classes = logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
        mask = Image.fromarray(classes, mode="P")
        mask.putpalette(palette)
        target = out / f"{path.stem}.png"
        mask.save(target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="best.pt / latest.pt of a training run")
    parser.add_argument("images", type=Path, help="folder of images to segment")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument(
        "--mode", choices=["full", "sliding"], default=None, help="default: the dataset's own"
    )
    parser.add_argument("--window", type=int, default=None, help="default: the training crop")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto = cuda, else mps, else cpu"
    )
    args = parser.parse_args(argv)
    device = select_device(args.device)
    trained = load_trained_model(args.checkpoint, device)
    written = predict_folder(trained, args.images, args.out, args.mode, args.window, device)
    print(f"wrote {len(written)} palette PNGs to {args.out}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
