"""Semi-supervised segmentation datasets in UniMatch's split-file format.

A split file lists one sample per line, ``image_path [mask_path]``, relative to the dataset root::

    JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png

(Cityscapes lines pair ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png``.)

Unlabelled lists may leave the mask path out. A bare VOC id (``2007_000032``, as in UniMatch's
Pascal split files) stands for ``JPEGImages/<id>.jpg SegmentationClass/<id>.png``. Masks are
single-channel index PNGs (Pascal's palette ``"P"`` mode or Cityscapes' ``"L"`` trainIds), read
without palette conversion; ``255`` means ignore.
"""

from __future__ import annotations

__all__ = [
    "VOC_CLASSES",
    "CITYSCAPES_CLASSES",
    "DEMO_CLASSES",
    "DatasetSpec",
    "DATASETS",
    "CUSTOM",
    "EVAL_MODES",
    "dataset_spec",
    "read_class_names",
    "spec_from_run_args",
    "MODES",
    "SplitEntry",
    "parse_split_line",
    "read_split_file",
    "write_split_file",
    "draw_labeled_split",
    "split_image",
    "without_validation_images",
    "check_no_validation_images",
    "scan_voc_layout",
    "scan_cityscapes_layout",
    "SemiSegDataset",
]

import os
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .demo_data import DEMO_CLASSES
from .transforms import (
    IGNORE_INDEX,
    StrongView,
    cutmix_box,
    mask_to_tensor,
    normalize,
    weak_view,
)

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)


class DatasetSpec(NamedTuple):
    """What the example loop needs to know about a dataset.

    Attributes:
        num_classes: number of classes (labels ``0..num_classes-1``, plus ``255`` = ignore).
        class_names: one name per class.
        hflip: whether horizontal flipping preserves the labels.
        crop_size: default training crop side.
        eval_mode: ``"full"`` (whole image at once) or ``"sliding"`` (crop-sized windows).
        resize_range: default ``(low, high)`` ratio of the weak view's random resize.
        ignore_index: the mask value that means "ignore" in the dataset's files (read as 255).
    """

    num_classes: int
    class_names: tuple[str, ...]
    hflip: bool
    crop_size: int
    eval_mode: str
    resize_range: tuple[float, float] = (0.5, 2.0)
    ignore_index: int = IGNORE_INDEX


DATASETS: dict[str, DatasetSpec] = {
    "voc": DatasetSpec(21, VOC_CLASSES, True, 321, "full"),
    "cityscapes": DatasetSpec(19, CITYSCAPES_CLASSES, True, 801, "sliding"),
    # Mirrored digits are not digits, so the demo must not flip. Its images are barely larger
    # than the crop, so a resize by up to 2x would show fragments of digits: 0.8-1.25 instead.
    "demo": DatasetSpec(len(DEMO_CLASSES), DEMO_CLASSES, False, 64, "full", (0.8, 1.25)),
}

#: A folder in Pascal VOC layout with its own classes, described by flags (see :func:`dataset_spec`).
CUSTOM = "custom"
EVAL_MODES: tuple[str, ...] = ("full", "sliding")
# What a custom dataset takes from VOC unless told otherwise; its classes it must be told.
_CUSTOM_BASE = DatasetSpec(0, (), True, 321, "full")

MODES: tuple[str, ...] = ("train_l", "train_u", "val")

PathLike = Union[str, "os.PathLike[str]"]


def dataset_spec(
    name: str,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ignore_index: int | None = None,
    hflip: bool | None = None,
    crop_size: int | None = None,
    eval_mode: str | None = None,
) -> DatasetSpec:
    """The spec of a registered dataset with the given fields replaced, or of a custom one.

    ``name="custom"`` is a Pascal VOC layout with its own classes: ``num_classes`` or
    ``class_names`` is required, the rest defaults to VOC's (flip, crop 321, full-image evaluation,
    255 = ignore). ``None`` keeps a field as it is. A new class count without names gets the names
    ``class_0 .. class_{K-1}``.

    Args:
        name: a key of :data:`DATASETS`, or ``"custom"``.
        num_classes: K, the labels ``0 .. K-1``.
        class_names: one distinct, non-blank name per class.
        ignore_index: the mask value meaning "ignore", in ``K .. 255`` (masks are 8-bit).
        hflip: whether horizontal flipping preserves the labels.
        crop_size: training crop side.
        eval_mode: one of :data:`EVAL_MODES`.

    Returns:
        The spec.

    Raises:
        ValueError: an unknown name, a custom dataset without classes, or an inconsistent field.
    """
    if name == CUSTOM:
        if num_classes is None and class_names is None:
            raise ValueError("a custom dataset needs its classes: give num_classes or class_names")
        base = _CUSTOM_BASE
    elif name in DATASETS:
        base = DATASETS[name]
    else:
        raise ValueError(
            f"unknown dataset {name!r}: expected one of {sorted(DATASETS)} or {CUSTOM!r}"
        )
    names = tuple(class_names) if class_names is not None else None
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes: {list(names)}")
    if names is None:
        k = num_classes if num_classes is not None else base.num_classes
        names = base.class_names if k == base.num_classes else tuple(f"class_{i}" for i in range(k))
    if not names or any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct and non-blank, got {list(names)}")
    ignore = base.ignore_index if ignore_index is None else int(ignore_index)
    if not len(names) <= ignore <= IGNORE_INDEX:
        raise ValueError(
            f"ignore_index must lie in {len(names)}..{IGNORE_INDEX} (outside the {len(names)} "
            f"class labels 0..{len(names) - 1}, and masks are 8-bit), got {ignore}"
        )
    mode = base.eval_mode if eval_mode is None else eval_mode
    if mode not in EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {mode!r}")
    crop = base.crop_size if crop_size is None else int(crop_size)
    if crop < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop}")
    return base._replace(
        num_classes=len(names),
        class_names=names,
        hflip=base.hflip if hflip is None else bool(hflip),
        crop_size=crop,
        eval_mode=mode,
        ignore_index=ignore,
    )


def read_class_names(values: Sequence[str]) -> tuple[str, ...]:
    """Class names given on a command line: the names themselves, or one file of one name a line.

    Args:
        values: the names, or a single path to an existing text file (blank lines skipped).

    Returns:
        The names, stripped.
    """
    if len(values) == 1 and Path(values[0]).is_file():
        lines = Path(values[0]).read_text().splitlines()
        return tuple(line.strip() for line in lines if line.strip())
    return tuple(value.strip() for value in values)


def spec_from_run_args(args: Mapping[str, Any]) -> DatasetSpec:
    """The spec of a run of the example loop from its arguments (``args.json``, a checkpoint's
    ``"args"``); arguments that an older run did not record keep the dataset's defaults."""
    return dataset_spec(
        args["dataset"],
        num_classes=args.get("num_classes"),
        class_names=args.get("class_names"),
        ignore_index=args.get("ignore_index"),
        hflip=args.get("hflip"),
        crop_size=args.get("crop_size"),
        eval_mode=args.get("eval_mode"),
    )


class SplitEntry(NamedTuple):
    """One parsed split line: image path and optional mask path, both relative to the root."""

    image: str
    mask: str | None


def parse_split_line(line: str) -> SplitEntry:
    """Parse one split line (``"img [mask]"`` or a bare VOC id).

    Args:
        line: the line, surrounding whitespace allowed.

    Returns:
        The image and mask paths relative to the dataset root.

    Raises:
        ValueError: the line is empty, has more than two fields, or uses an absolute path.
    """
    fields = line.split()
    if not 1 <= len(fields) <= 2:
        raise ValueError(
            f"malformed split line {line!r}: expected 'image_path [mask_path]' or a VOC id"
        )
    for field in fields:
        if os.path.isabs(field):
            raise ValueError(f"malformed split line {line!r}: paths must be relative to the root")
    if len(fields) == 1 and "/" not in fields[0] and "." not in fields[0]:
        return SplitEntry(f"JPEGImages/{fields[0]}.jpg", f"SegmentationClass/{fields[0]}.png")
    return SplitEntry(fields[0], fields[1] if len(fields) == 2 else None)


def read_split_file(path: PathLike) -> list[str]:
    """Read a split file, dropping blank lines and validating every other line.

    Args:
        path: the split file.

    Returns:
        The stripped lines, in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is malformed; the message names the file and line number.
    """
    split_path = Path(path)
    if not split_path.is_file():
        raise FileNotFoundError(f"split file not found: {split_path}")
    lines = []
    for number, raw in enumerate(split_path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        try:
            parse_split_line(line)
        except ValueError as error:
            raise ValueError(f"{split_path}:{number}: {error}") from None
        lines.append(line)
    return lines


def write_split_file(path: PathLike, lines: Sequence[str]) -> Path:
    """Write split lines, one per line, creating parent folders.

    Args:
        path: the split file to write.
        lines: split lines (each validated with :func:`parse_split_line`).

    Returns:
        The written path.
    """
    for line in lines:
        parse_split_line(line)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line.strip() + "\n" for line in lines))
    return out


def draw_labeled_split(
    all_lines: Sequence[str], num_labeled: int, seed: int
) -> tuple[list[str], list[str]]:
    """Draw ``num_labeled`` lines as the labelled set; the rest is the unlabelled set.

    Deterministic in ``seed``; both outputs keep the input order.

    Args:
        all_lines: every training line, no duplicates.
        num_labeled: size of the labelled set, ``1 <= num_labeled <= len(all_lines)``.
        seed: seed of the draw.

    Returns:
        ``(labeled_lines, unlabeled_lines)``, disjoint, together equal to ``all_lines``.

    Raises:
        ValueError: ``num_labeled`` is out of range or ``all_lines`` has duplicates.
    """
    lines = list(all_lines)
    if not 1 <= num_labeled <= len(lines):
        raise ValueError(f"num_labeled must be in 1..{len(lines)}, got {num_labeled}")
    if len(set(lines)) != len(lines):
        raise ValueError("all_lines contains duplicate lines; labelled/unlabelled would overlap")
    chosen = np.random.default_rng(seed).choice(len(lines), size=num_labeled, replace=False)
    is_labeled = np.zeros(len(lines), dtype=bool)
    is_labeled[chosen] = True
    labeled = [line for line, flag in zip(lines, is_labeled) if flag]
    unlabeled = [line for line, flag in zip(lines, is_labeled) if not flag]
    return labeled, unlabeled


def split_image(line: str) -> str:
    """The image a split line names, as a normalised relative path (a bare VOC id expanded).

    Args:
        line: a split line.

    Returns:
        e.g. ``"JPEGImages/2007_000032.jpg"`` for ``"2007_000032"`` and for
        ``"./JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png"``.
    """
    return posixpath.normpath(parse_split_line(line).image)


def without_validation_images(lines: Sequence[str], val_lines: Sequence[str]) -> list[str]:
    """The training pool: ``lines`` minus every line whose image the validation split names.

    In Pascal VOC (and any folder in its layout) the validation images have masks and sit in the
    same folders as the training images, so a pool scanned from the folders holds them too.

    Args:
        lines: candidate training lines.
        val_lines: the validation split.

    Returns:
        The lines of ``lines`` whose image is not in ``val_lines``, in their order.

    Raises:
        ValueError: every line is a validation image.
    """
    val_images = {split_image(line) for line in val_lines}
    pool = [line for line in lines if split_image(line) not in val_images]
    if lines and not pool:
        raise ValueError(
            f"all {len(lines)} training images are in the validation split: nothing is left to train on"
        )
    return pool


def check_no_validation_images(lines: Sequence[str], val_lines: Sequence[str], name: str) -> None:
    """Raise if a training split names an image of the validation split.

    Args:
        lines: a labelled or unlabelled split.
        val_lines: the validation split.
        name: how the message refers to ``lines`` (e.g. its file).

    Raises:
        ValueError: the splits share images; the message counts them and names the first.
    """
    val_images = {split_image(line) for line in val_lines}
    shared = [image for image in map(split_image, lines) if image in val_images]
    if shared:
        raise ValueError(
            f"{name} shares {len(shared)} image(s) with the validation split (first: {shared[0]}): "
            "training on validation images would inflate the reported mIoU; remove them from one "
            "of the two lists"
        )


def _existing_root(root: PathLike) -> Path:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"data root not found: {base}")
    return base


def scan_voc_layout(root: PathLike) -> list[str]:
    """List the split lines of every ``JPEGImages/*.jpg`` that has a ``SegmentationClass/*.png``.

    Args:
        root: dataset root in Pascal VOC layout.

    Returns:
        Sorted split lines ``"JPEGImages/x.jpg SegmentationClass/x.png"``.

    Raises:
        FileNotFoundError: the root or ``JPEGImages`` is missing, or no image has a mask.
    """
    base = _existing_root(root)
    images = base / "JPEGImages"
    if not images.is_dir():
        raise FileNotFoundError(f"no JPEGImages folder in {base}")
    lines = [
        f"JPEGImages/{path.name} SegmentationClass/{path.stem}.png"
        for path in sorted(images.glob("*.jpg"))
        if (base / "SegmentationClass" / f"{path.stem}.png").is_file()
    ]
    if not lines:
        raise FileNotFoundError(f"no JPEGImages/*.jpg with a SegmentationClass/*.png in {base}")
    return lines


def scan_cityscapes_layout(root: PathLike, split: str) -> list[str]:
    """List the split lines of a Cityscapes split (fine annotations, 19 train ids).

    Args:
        root: dataset root holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        Sorted lines ``"leftImg8bit/<split>/<city>/<n>_leftImg8bit.png
        gtFine/<split>/<city>/<n>_gtFine_labelTrainIds.png"`` for images whose mask exists.

    Raises:
        FileNotFoundError: the split folder is missing or no image has a trainIds mask.
    """
    base = _existing_root(root)
    images = base / "leftImg8bit" / split
    if not images.is_dir():
        raise FileNotFoundError(f"Cityscapes images not found: {images}")
    suffix = "_leftImg8bit.png"
    lines = []
    for path in sorted(images.glob(f"*/*{suffix}")):
        name = path.name[: -len(suffix)]
        mask = f"gtFine/{split}/{path.parent.name}/{name}_gtFine_labelTrainIds.png"
        if (base / mask).is_file():
            lines.append(f"leftImg8bit/{split}/{path.parent.name}/{path.name} {mask}")
    if not lines:
        raise FileNotFoundError(
            f"no image in {images} has a gtFine/{split}/<city>/*_gtFine_labelTrainIds.png mask "
            "(cityscapesScripts' createTrainIdLabelImgs writes them)"
        )
    return lines


class SemiSegDataset(Dataset):
    """Labelled, unlabelled or validation samples of a segmentation dataset, UniMatch-style.

    ``mode="train_l"`` returns the weak view of an image and its mask; ``mode="train_u"`` returns
    the weak view, two independent strong views of it, the ignore mask of the padding and two
    CutMix boxes; ``mode="val"`` returns the full image, its mask and its id. Masks are checked
    against ``num_classes`` every time one is loaded.

    Args:
        root: dataset root; split paths are relative to it.
        split: a split file path, or a sequence of split lines / VOC ids.
        mode: ``"train_l"``, ``"train_u"`` or ``"val"``.
        crop_size: training crop side ``S`` or ``(H, W)``; unused (may be ``None``) for ``"val"``.
        num_classes: number of classes; mask values must be below it or equal to 255.
        hflip: random horizontal flip in the weak view.
        base_size: reference long side of the random resize; ``None`` uses each image's own.
        ratio_range: range of the random resize ratio.
        min_length: if the split has fewer lines, repeat it to exactly this many (UniMatch does
            this for the labelled set so that it lasts as long as the unlabelled one).
        cutmix_p: probability that a CutMix box is non-empty.
        ignore_index: the mask value that means "ignore" in the files; it reads as 255, the
            ignore label of everything downstream.

    Shape:
        - ``train_l``: image ``(3, H, W)`` float, mask ``(H, W)`` long, ``(H, W) = crop_size``.
        - ``train_u``: image_weak, image_strong1, image_strong2 ``(3, H, W)`` float;
          ignore_mask ``(H, W)`` long (255 on padding, else 0); cutmix_box1, cutmix_box2
          ``(H, W)`` long in {0, 1}.
        - ``val``: image ``(3, H0, W0)`` float, mask ``(H0, W0)`` long at the image's own size,
          and the image id (file stem) as ``str``.

    Raises:
        FileNotFoundError: the root, the split file, or a file named by a split line is missing.
        ValueError: a bad mode, class count or split line.
    """

    def __init__(
        self,
        root: PathLike,
        split: PathLike | Sequence[str],
        mode: str,
        crop_size: int | tuple[int, int] | None,
        num_classes: int,
        hflip: bool = True,
        base_size: int | None = None,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        min_length: int | None = None,
        cutmix_p: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX}, got {num_classes}")
        if not num_classes <= ignore_index <= IGNORE_INDEX:
            raise ValueError(
                f"ignore_index must be in {num_classes}..{IGNORE_INDEX}, got {ignore_index}"
            )
        if mode != "val" and crop_size is None:
            raise ValueError(f"mode {mode!r} needs a crop_size")
        self.root = _existing_root(root)
        self.mode = mode
        self.crop_size = crop_size
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.hflip = hflip
        self.base_size = base_size
        self.ratio_range = ratio_range
        self.cutmix_p = cutmix_p
        self.strong_view = StrongView()

        lines = read_split_file(split) if isinstance(split, (str, os.PathLike)) else list(split)
        if not lines:
            raise ValueError(f"the split for mode {mode!r} is empty")
        entries = [parse_split_line(line) for line in lines]
        for entry in entries:
            self._check_entry(entry)
        if min_length is not None and len(entries) < min_length:
            entries = (entries * -(-min_length // len(entries)))[:min_length]
        self.entries: list[SplitEntry] = entries

    def _check_entry(self, entry: SplitEntry) -> None:
        image = self.root / entry.image
        if not image.is_file():
            raise FileNotFoundError(f"image named in the split not found: {image}")
        if self.mode == "train_u":
            return
        if entry.mask is None:
            raise ValueError(f"mode {self.mode!r} needs a mask path, split line has only {image}")
        mask = self.root / entry.mask
        if not mask.is_file():
            raise FileNotFoundError(f"mask named in the split not found: {mask}")

    def __len__(self) -> int:
        return len(self.entries)

    def _load_image(self, entry: SplitEntry) -> Image.Image:
        with Image.open(self.root / entry.image) as image:
            return image.convert("RGB")

    def _load_mask(self, entry: SplitEntry, image_size: tuple[int, int]) -> Image.Image:
        assert entry.mask is not None
        path = self.root / entry.mask
        with Image.open(path) as opened:
            if opened.mode not in ("L", "P"):
                raise ValueError(
                    f"{path}: a mask must be a single-channel index PNG ('L' or 'P'), "
                    f"got mode {opened.mode!r}"
                )
            mask = opened.copy()
        if mask.size != image_size:
            raise ValueError(
                f"{path}: mask size (W, H) = {mask.size} differs from its image's {image_size}"
            )
        labels = np.asarray(mask)
        values = np.unique(labels)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
        if bad.size:
            raise ValueError(
                f"{path}: labels {bad.tolist()} out of range for {self.num_classes} classes "
                f"(valid: 0..{self.num_classes - 1} and {self.ignore_index} = ignore)"
            )
        if self.ignore_index != IGNORE_INDEX and self.ignore_index in values:
            remapped = np.where(labels == self.ignore_index, IGNORE_INDEX, labels)
            mask = Image.fromarray(remapped.astype(np.uint8))
        return mask

    def _weak(self, image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        assert self.crop_size is not None
        return weak_view(
            image, mask, self.crop_size, self.ratio_range, self.base_size, self.hflip, IGNORE_INDEX
        )

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        entry = self.entries[index]
        image = self._load_image(entry)
        if self.mode == "val":
            mask = self._load_mask(entry, image.size)
            return normalize(image), mask_to_tensor(mask), Path(entry.image).stem
        if self.mode == "train_l":
            image, mask = self._weak(image, self._load_mask(entry, image.size))
            return normalize(image), mask_to_tensor(mask)
        # An all-zero mask padded with 255 is exactly the ignore mask of the unlabelled view.
        image_weak, ignore_mask = self._weak(image, Image.new("L", image.size, 0))
        box_size = (image_weak.height, image_weak.width)
        return (
            normalize(image_weak),
            normalize(self.strong_view(image_weak)),
            normalize(self.strong_view(image_weak)),
            mask_to_tensor(ignore_mask),
            cutmix_box(box_size, self.cutmix_p),
            cutmix_box(box_size, self.cutmix_p),
        )
