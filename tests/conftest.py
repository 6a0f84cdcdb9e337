"""Shared pytest fixtures; also puts ``examples/`` on ``sys.path`` for ``ddfp_examples``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))


def _random_pair(
    rng: np.random.Generator, height: int, width: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, num_classes, size=(height, width), dtype=np.uint8)
    mask[rng.random((height, width)) < 0.1] = 255
    return image, mask


@pytest.fixture(scope="session")
def tiny_voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-image Pascal VOC layout (about 40x50 px, 21 classes, some 255) with split files.

    ``train_l.txt`` holds 3 labelled lines, ``train_u.txt`` 6 unlabelled lines (half without a
    mask path), ``val.txt`` 3 lines; all paths relative to the returned root.
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_voc")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=768, dtype=np.uint8).tolist()
    lines = []
    for index in range(12):
        height, width = 38 + index % 5, 48 + index % 4
        image, mask = _random_pair(rng, height, width, 21)
        name = f"2007_{index:06d}"
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        mask_image = Image.fromarray(mask)
        mask_image.putpalette(palette)
        mask_image.save(root / "SegmentationClass" / f"{name}.png")
        lines.append(f"JPEGImages/{name}.jpg SegmentationClass/{name}.png")
    unlabeled = [line if i % 2 else line.split()[0] for i, line in enumerate(lines[3:9])]
    (root / "train_l.txt").write_text("\n".join(lines[:3]) + "\n")
    (root / "train_u.txt").write_text("\n".join(unlabeled) + "\n")
    (root / "val.txt").write_text("\n".join(lines[9:]) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_cityscapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Cityscapes layout with two cities in ``train`` (2 + 2 images) and one in ``val`` (2).

    Images are 24x48 RGB PNGs, masks ``"L"``-mode trainIds in ``0..18`` with some 255.
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_cityscapes")
    rng = np.random.default_rng(1)
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("lindau",))):
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for index in range(2):
                image, mask = _random_pair(rng, 24, 48, 19)
                name = f"{city}_{index:06d}_000019"
                Image.fromarray(image).save(
                    root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
                )
                Image.fromarray(mask).save(
                    root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png"
                )
    return root
