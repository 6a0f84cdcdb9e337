"""Write a small segmentation dataset in Pascal VOC layout with as many classes as asked.

    python examples/make_shapes_dataset.py data/shapes --num-classes 3

Class 0 is the background, a noisy grey texture; every other class is a filled shape with a form
(rectangle, disc, triangle, in turn) and a colour of its own. Masks mark a one-pixel band around
each shape with the ignore value, as Pascal VOC marks object borders with 255. What it writes::

    JPEGImages/shapes_0000.jpg        the images
    SegmentationClass/shapes_0000.png palette ("P") masks of class indices, as VOC's
    val.txt                           the last ``--val`` ids, one bare id a line (UniMatch's style)
    classes.txt                       one class name a line

Every image has a mask and the validation images sit in the same folders as the training ones, as
in VOC: the example loop draws its labelled and unlabelled sets from the rest.
"""

from __future__ import annotations

import argparse
import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["FORMS", "default_class_names", "make_shapes_dataset", "main"]

FORMS: tuple[str, ...] = ("rectangle", "disc", "triangle")


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """``background`` and one name per shape class: its form, numbered once the forms repeat."""
    names = ["background"]
    for label in range(1, num_classes):
        form = FORMS[(label - 1) % len(FORMS)]
        names.append(form if label <= len(FORMS) else f"{form}_{label}")
    return tuple(names)


def _colour(label: int, num_classes: int) -> tuple[int, int, int]:
    hue = (label - 1) / max(num_classes - 1, 1)
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.9, 0.95)
    return round(255 * red), round(255 * green), round(255 * blue)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    form: str,
    box: tuple[int, int, int, int],
    fill: int | tuple[int, int, int],
    outline: int | None = None,
) -> None:
    left, top, right, bottom = box
    if form == "rectangle":
        draw.rectangle(box, fill=fill, outline=outline)
    elif form == "disc":
        draw.ellipse(box, fill=fill, outline=outline)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill, outline)


def make_shapes_dataset(
    root: str | Path,
    num_classes: int = 3,
    num_images: int = 32,
    num_val: int = 8,
    size: tuple[int, int] = (64, 80),
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root`` (created; existing files of the same names are replaced).

    Args:
        root: the dataset root.
        num_classes: K >= 2: the background and K - 1 shape classes.
        num_images: images in all, validation included.
        num_val: how many of them (the last ones) ``val.txt`` lists.
        size: image ``(H, W)``.
        ignore_index: mask value of the band around each shape, in ``K .. 255``.
        class_names: K names for ``classes.txt``; default :func:`default_class_names`.
        seed: seeds every drawn shape, colour jitter and texture.

    Returns:
        The root.

    Raises:
        ValueError: a count, size, ignore value or name list that does not fit.
    """
    if not 2 <= num_classes <= 255:
        raise ValueError(f"num_classes must be in 2..255, got {num_classes}")
    if not 1 <= num_val < num_images:
        raise ValueError(f"need 1 <= num_val < num_images, got {num_val} and {num_images}")
    if not num_classes <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be in {num_classes}..255, got {ignore_index}")
    height, width = size
    if min(height, width) < 16:
        raise ValueError(f"images must be at least 16 x 16, got {height} x {width}")
    names = tuple(class_names) if class_names is not None else default_class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")

    base = Path(root)
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    palette = [0, 0, 0]
    for label in range(1, 256):
        palette += _colour(label, num_classes) if label < num_classes else [255, 255, 255]
    rng = np.random.default_rng(seed)
    ids = []
    for index in range(num_images):
        texture = rng.normal(110, 25, size=(height, width, 1)) + rng.normal(0, 8, (1, 1, 3))
        image = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8).repeat(1, 2))
        mask = Image.new("P", (width, height), 0)
        mask.putpalette(palette)
        draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        # Every image shows at least one shape, and over the set every class appears.
        labels = [1 + index % (num_classes - 1)]
        labels += rng.integers(1, num_classes, size=rng.integers(0, 3)).tolist()
        for label in labels:
            side = int(rng.integers(min(height, width) // 4, min(height, width) // 2 + 1))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            box = (left, top, left + side - 1, top + side - 1)
            form = FORMS[(label - 1) % len(FORMS)]
            jitter = rng.integers(-20, 21, size=3)
            colour = tuple(
                int(c) for c in np.clip(np.array(_colour(label, num_classes)) + jitter, 0, 255)
            )
            _draw_shape(draw_image, form, box, colour)
            _draw_shape(draw_mask, form, box, label, outline=ignore_index)
        name = f"shapes_{index:04d}"
        image.save(base / "JPEGImages" / f"{name}.jpg", quality=95)
        mask.save(base / "SegmentationClass" / f"{name}.png")
        ids.append(name)
    (base / "val.txt").write_text("".join(f"{name}\n" for name in ids[-num_val:]))
    (base / "classes.txt").write_text("".join(f"{name}\n" for name in names))
    return base


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", type=Path, help="dataset root to write")
    parser.add_argument("--num-classes", type=int, default=3, help="background + shape classes")
    parser.add_argument("--images", type=int, default=32, help="images in all")
    parser.add_argument("--val", type=int, default=8, help="of which validation images")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 80), metavar=("H", "W"))
    parser.add_argument("--ignore-index", type=int, default=255, help="mask value of the borders")
    parser.add_argument("--class-names", nargs="+", default=None, help="default: by form")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = make_shapes_dataset(
        args.root,
        args.num_classes,
        args.images,
        args.val,
        tuple(args.size),
        args.ignore_index,
        args.class_names,
        args.seed,
    )
    print(
        f"wrote {args.images} images of {args.num_classes} classes to {root} "
        f"(val.txt: {args.val} ids; classes.txt)"
    )
    return root


if __name__ == "__main__":
    main()
