"""Tests of the examples' split handling, UniMatch views and SemiSegDataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ddfp_examples.datasets import (
    CITYSCAPES_CLASSES,
    CUSTOM,
    DATASETS,
    DEMO_CLASSES,
    VOC_CLASSES,
    SemiSegDataset,
    check_no_validation_images,
    dataset_spec,
    draw_labeled_split,
    parse_split_line,
    read_class_names,
    read_split_file,
    scan_cityscapes_layout,
    scan_voc_layout,
    spec_from_run_args,
    split_image,
    without_validation_images,
    write_split_file,
)
from ddfp_examples.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StrongView,
    cutmix_box,
    mask_to_tensor,
    normalize,
    random_hflip,
    random_resize,
    weak_view,
)
from PIL import Image

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
STD = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]


def _expected_normalized(image: Image.Image) -> np.ndarray:
    raw = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (raw - MEAN) / STD


def _copy_root(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


# Split files ---------------------------------------------------------------------------------


def test_read_split_file_skips_blank_lines_and_keeps_file_order(tmp_path: Path) -> None:
    path = tmp_path / "split.txt"
    path.write_text("  JPEGImages/b.jpg SegmentationClass/b.png\n\nJPEGImages/a.jpg\n   \n")
    assert read_split_file(path) == ["JPEGImages/b.jpg SegmentationClass/b.png", "JPEGImages/a.jpg"]


def test_parse_split_line_reads_optional_mask_and_expands_bare_voc_id() -> None:
    assert parse_split_line("JPEGImages/x.jpg SegmentationClass/x.png") == (
        "JPEGImages/x.jpg",
        "SegmentationClass/x.png",
    )
    assert parse_split_line("JPEGImages/x.jpg") == ("JPEGImages/x.jpg", None)
    assert parse_split_line("2007_000032") == (
        "JPEGImages/2007_000032.jpg",
        "SegmentationClass/2007_000032.png",
    )


def test_malformed_split_line_raises_naming_file_and_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("JPEGImages/a.jpg SegmentationClass/a.png\nJPEGImages/b.jpg x.png extra\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: malformed split line"):
        read_split_file(path)


def test_absolute_path_in_split_line_is_rejected() -> None:
    with pytest.raises(ValueError, match="relative to the root"):
        parse_split_line("/data/JPEGImages/a.jpg")


def test_missing_split_file_raises_file_not_found_with_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_split_file(tmp_path / "nope.txt")


def test_write_then_read_split_file_round_trips(tmp_path: Path) -> None:
    lines = ["JPEGImages/a.jpg SegmentationClass/a.png", "JPEGImages/b.jpg"]
    path = write_split_file(tmp_path / "sub" / "s.txt", lines)
    assert read_split_file(path) == lines


def test_draw_labeled_split_is_deterministic_disjoint_and_complete() -> None:
    lines = [f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in range(50)]
    labeled, unlabeled = draw_labeled_split(lines, 7, seed=3)
    again = draw_labeled_split(lines, 7, seed=3)
    other, _ = draw_labeled_split(lines, 7, seed=4)
    assert (labeled, unlabeled) == again
    assert len(labeled) == 7 and len(unlabeled) == 43
    assert not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == sorted(lines)
    assert labeled == [line for line in lines if line in set(labeled)]
    assert other != labeled


def test_draw_labeled_split_rejects_bad_count_and_duplicates() -> None:
    lines = ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(ValueError, match="num_labeled must be in 1..3, got 4"):
        draw_labeled_split(lines, 4, seed=0)
    with pytest.raises(ValueError, match="num_labeled must be in 1..3, got 0"):
        draw_labeled_split(lines, 0, seed=0)
    with pytest.raises(ValueError, match="duplicate"):
        draw_labeled_split(lines + ["a.jpg"], 1, seed=0)


def test_scan_voc_layout_lists_only_images_with_a_mask(tiny_voc_root: Path, tmp_path: Path) -> None:
    root = _copy_root(tiny_voc_root, tmp_path)
    (root / "SegmentationClass" / "2007_000004.png").unlink()
    lines = scan_voc_layout(root)
    assert len(lines) == 11
    assert "JPEGImages/2007_000004.jpg SegmentationClass/2007_000004.png" not in lines
    assert lines == sorted(lines)


def test_split_image_is_the_same_for_a_bare_id_a_full_line_and_a_dotted_path() -> None:
    image = "JPEGImages/2007_000032.jpg"
    assert split_image("2007_000032") == image
    assert split_image("JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png") == image
    assert split_image("./JPEGImages//2007_000032.jpg") == image
    assert split_image("JPEGImages/2007_000033.jpg") != image


def test_without_validation_images_keeps_the_order_of_the_rest_and_refuses_an_empty_pool() -> None:
    lines = [f"JPEGImages/{n}.jpg SegmentationClass/{n}.png" for n in ("c", "a", "d", "b")]
    val = ["a", "JPEGImages/b.jpg SegmentationClass/b.png", "JPEGImages/z.jpg"]
    assert without_validation_images(lines, val) == [lines[0], lines[2]]
    assert without_validation_images(lines, []) == lines
    with pytest.raises(ValueError, match="all 4 training images are in the validation split"):
        without_validation_images(lines, [*val, "c", "d"])


def test_check_no_validation_images_counts_the_shared_images_and_names_the_first() -> None:
    check_no_validation_images(["JPEGImages/a.jpg"], ["JPEGImages/b.jpg"], "train.txt")
    with pytest.raises(ValueError, match=r"train\.txt shares 2 image\(s\).*first: JPEGImages/b"):
        check_no_validation_images(["a", "b", "c"], ["c", "JPEGImages/b.jpg x.png"], "train.txt")


def test_scan_voc_layout_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data root not found: .*absent"):
        scan_voc_layout(tmp_path / "absent")


def test_scan_cityscapes_layout_pairs_images_with_train_id_masks(
    tiny_cityscapes_root: Path,
) -> None:
    lines = scan_cityscapes_layout(tiny_cityscapes_root, "train")
    assert len(lines) == 4
    assert {line.split("/")[2] for line in lines} == {"aachen", "bremen"}
    for line in lines:
        image, mask = line.split()
        assert (
            image.replace("leftImg8bit", "gtFine", 1).replace(
                "_leftImg8bit.png", "_gtFine_labelTrainIds.png"
            )
            == mask
        )
        assert (tiny_cityscapes_root / mask).is_file()
    assert len(scan_cityscapes_layout(tiny_cityscapes_root, "val")) == 2
    with pytest.raises(FileNotFoundError, match="test"):
        scan_cityscapes_layout(tiny_cityscapes_root, "test")


def test_dataset_registry_class_counts_match_class_names() -> None:
    assert len(VOC_CLASSES) == 21 and len(CITYSCAPES_CLASSES) == 19 and len(DEMO_CLASSES) == 6
    assert DEMO_CLASSES[0] == "background" and DEMO_CLASSES[1:] == tuple("01234")
    for spec in DATASETS.values():
        assert spec.num_classes == len(spec.class_names)
        assert spec.eval_mode in ("full", "sliding")
    assert DATASETS["cityscapes"].eval_mode == "sliding"
    assert DATASETS["demo"].hflip is False


# Views ---------------------------------------------------------------------------------------


def test_normalize_and_mask_to_tensor_match_independent_numpy() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    np.testing.assert_allclose(normalize(image).numpy(), _expected_normalized(image), atol=1e-6)
    indices = rng.integers(0, 21, (5, 7), dtype=np.uint8)
    mask = Image.fromarray(indices)
    mask.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    assert mask.mode == "P"
    tensor = mask_to_tensor(mask)
    assert tensor.dtype == torch.long and torch.equal(tensor, torch.from_numpy(indices).long())


def test_random_hflip_flips_image_and_mask_together() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 21, (4, 6), dtype=np.uint8)
    image, mask = random_hflip(Image.fromarray(pixels), Image.fromarray(labels), p=1.0)
    np.testing.assert_array_equal(np.asarray(image), pixels[:, ::-1])
    np.testing.assert_array_equal(np.asarray(mask), labels[:, ::-1])
    image, mask = random_hflip(Image.fromarray(pixels), Image.fromarray(labels), p=0.0)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_random_resize_long_side_in_ratio_range_and_mask_keeps_its_labels() -> None:
    rng = np.random.default_rng(2)
    labels = rng.choice(np.array([0, 3, 7, 255], dtype=np.uint8), size=(30, 40))
    image = Image.new("RGB", (40, 30))
    generator = torch.Generator().manual_seed(0)
    long_sides = []
    for _ in range(50):
        resized_image, resized_mask = random_resize(
            image, Image.fromarray(labels), (0.5, 2.0), generator=generator
        )
        assert resized_image.size == resized_mask.size
        long_sides.append(max(resized_image.size))
        assert set(np.unique(np.asarray(resized_mask))) <= {0, 3, 7, 255}
    assert 20 <= min(long_sides) and max(long_sides) <= 80
    assert max(long_sides) - min(long_sides) > 20
    fixed, _ = random_resize(image, Image.fromarray(labels), (1.2, 1.2), base_size=100)
    assert fixed.size == (120, 90)


def test_weak_view_pads_image_black_and_mask_255_when_smaller_than_crop() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    labels = rng.integers(0, 21, (10, 14), dtype=np.uint8)
    image, mask = weak_view(
        Image.fromarray(pixels), Image.fromarray(labels), (16, 20), (1.0, 1.0), hflip=False
    )
    assert image.size == (20, 16) and mask.size == (20, 16)
    out_pixels, out_labels = np.asarray(image), np.asarray(mask)
    np.testing.assert_array_equal(out_pixels[:10, :14], pixels)
    np.testing.assert_array_equal(out_labels[:10, :14], labels)
    assert (out_pixels[10:] == 0).all() and (out_pixels[:, 14:] == 0).all()
    assert (out_labels[10:] == 255).all() and (out_labels[:, 14:] == 255).all()


def test_weak_view_flips_image_and_mask_consistently_over_seeds() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 21, (12, 18), dtype=np.uint8)
    pixels = np.repeat((labels * 12)[:, :, None], 3, axis=2)
    flipped_seen = unflipped_seen = False
    for seed in range(16):
        generator = torch.Generator().manual_seed(seed)
        image, mask = weak_view(
            Image.fromarray(pixels),
            Image.fromarray(labels),
            (12, 18),
            (1.0, 1.0),
            hflip=True,
            generator=generator,
        )
        out_pixels, out_labels = np.asarray(image), np.asarray(mask)
        np.testing.assert_array_equal(out_pixels[:, :, 0], out_labels * 12)
        flipped_seen |= np.array_equal(out_labels, labels[:, ::-1])
        unflipped_seen |= np.array_equal(out_labels, labels)
    assert flipped_seen and unflipped_seen


def test_strong_view_without_jitter_or_blur_but_always_grayscale_gives_equal_channels() -> None:
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8))
    grey = np.asarray(StrongView(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0)(image))
    assert grey.shape == (8, 9, 3)
    assert (grey[:, :, 0] == grey[:, :, 1]).all() and (grey[:, :, 1] == grey[:, :, 2]).all()
    identity = StrongView(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)(image)
    np.testing.assert_array_equal(np.asarray(identity), np.asarray(image))
    torch.manual_seed(0)
    changed = [
        not np.array_equal(np.asarray(StrongView()(image)), np.asarray(image)) for _ in range(10)
    ]
    assert sum(changed) >= 5


def test_strong_view_blur_smooths_and_works_on_images_smaller_than_the_kernel() -> None:
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    torch.manual_seed(0)
    blurred = np.asarray(
        StrongView(jitter_p=0.0, grayscale_p=0.0, blur_p=1.0)(Image.fromarray(pixels))
    )
    assert blurred.shape == (5, 4, 3)
    assert (
        np.diff(blurred.astype(float), axis=1).std() < np.diff(pixels.astype(float), axis=1).std()
    )


def test_cutmix_box_is_one_rectangle_with_area_and_aspect_in_bounds() -> None:
    generator = torch.Generator().manual_seed(0)
    height, width = 64, 48
    for _ in range(300):
        box = cutmix_box((height, width), p=1.0, generator=generator)
        assert box.shape == (height, width) and box.dtype == torch.long
        rows = torch.nonzero(box.any(dim=1)).flatten()
        cols = torch.nonzero(box.any(dim=0)).flatten()
        box_h = int(rows[-1] - rows[0] + 1)
        box_w = int(cols[-1] - cols[0] + 1)
        assert int(box.sum()) == box_h * box_w
        assert set(box.unique().tolist()) == {0, 1}
        # Rounding each side to whole pixels moves the area and aspect by at most half a pixel.
        area = box_h * box_w / (height * width)
        assert 0.02 * 0.8 <= area <= 0.4 * 1.1
        assert 0.3 * 0.85 <= box_h / box_w <= (1 / 0.3) / 0.85


def test_cutmix_box_probability_zero_is_empty_and_half_is_about_half() -> None:
    generator = torch.Generator().manual_seed(1)
    assert all(int(cutmix_box(32, p=0.0, generator=generator).sum()) == 0 for _ in range(50))
    non_empty = sum(int(cutmix_box(32, p=0.5, generator=generator).sum()) > 0 for _ in range(400))
    assert 150 <= non_empty <= 250


# SemiSegDataset ------------------------------------------------------------------------------


def test_train_l_items_have_crop_shape_and_valid_labels(tiny_voc_root: Path) -> None:
    dataset = SemiSegDataset(tiny_voc_root, tiny_voc_root / "train_l.txt", "train_l", 32, 21)
    torch.manual_seed(0)
    image, mask = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.long
    values = set(mask.unique().tolist())
    assert values <= set(range(21)) | {255}


def test_train_u_items_have_weak_strong_views_ignore_mask_and_cutmix_boxes(
    tiny_voc_root: Path,
) -> None:
    dataset = SemiSegDataset(tiny_voc_root, tiny_voc_root / "train_u.txt", "train_u", 128, 21)
    torch.manual_seed(0)
    weak, strong1, strong2, ignore_mask, box1, box2 = dataset[0]
    for image in (weak, strong1, strong2):
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    for mask in (ignore_mask, box1, box2):
        assert mask.shape == (128, 128) and mask.dtype == torch.long
    assert set(ignore_mask.unique().tolist()) == {0, 255}
    assert set(box1.unique().tolist()) <= {0, 1} and set(box2.unique().tolist()) <= {0, 1}
    padding = ignore_mask == 255
    black = torch.from_numpy(-MEAN / STD)
    assert torch.allclose(weak[:, padding], black.reshape(3, 1).expand(3, int(padding.sum())))


def test_unlabeled_padding_is_marked_in_ignore_mask_and_image_is_black_there(
    tiny_voc_root: Path,
) -> None:
    dataset = SemiSegDataset(
        tiny_voc_root,
        tiny_voc_root / "train_u.txt",
        "train_u",
        (48, 64),
        21,
        hflip=False,
        ratio_range=(1.0, 1.0),
    )
    weak, _, _, ignore_mask, _, _ = dataset[0]
    source = Image.open(tiny_voc_root / dataset.entries[0].image)
    width, height = source.size
    assert (ignore_mask[:height, :width] == 0).all()
    assert (ignore_mask[height:] == 255).all() and (ignore_mask[:, width:] == 255).all()
    expected = torch.from_numpy(_expected_normalized(source))
    assert torch.allclose(weak[:, :height, :width], expected, atol=1e-5)
    black = torch.from_numpy(-MEAN / STD)
    assert torch.allclose(weak[:, height:, :], black.expand(3, 48 - height, 64), atol=1e-6)


def test_labeled_padding_gets_255_and_original_labels_inside(tiny_voc_root: Path) -> None:
    dataset = SemiSegDataset(
        tiny_voc_root,
        tiny_voc_root / "train_l.txt",
        "train_l",
        64,
        21,
        hflip=False,
        ratio_range=(1.0, 1.0),
    )
    _, mask = dataset[1]
    labels = np.asarray(Image.open(tiny_voc_root / str(dataset.entries[1].mask)))
    height, width = labels.shape
    np.testing.assert_array_equal(mask[:height, :width].numpy(), labels)
    assert (mask[height:] == 255).all() and (mask[:, width:] == 255).all()


def test_val_returns_full_image_its_index_mask_and_id(tiny_voc_root: Path) -> None:
    dataset = SemiSegDataset(tiny_voc_root, tiny_voc_root / "val.txt", "val", None, 21)
    image, mask, name = dataset[2]
    entry = dataset.entries[2]
    source = Image.open(tiny_voc_root / entry.image)
    labels = np.asarray(Image.open(tiny_voc_root / str(entry.mask)))
    assert name == Path(entry.image).stem == "2007_000011"
    assert image.shape == (3, source.height, source.width)
    np.testing.assert_allclose(image.numpy(), _expected_normalized(source), atol=1e-5)
    np.testing.assert_array_equal(mask.numpy(), labels)


def test_cityscapes_lines_load_through_the_same_dataset(tiny_cityscapes_root: Path) -> None:
    lines = scan_cityscapes_layout(tiny_cityscapes_root, "val")
    dataset = SemiSegDataset(tiny_cityscapes_root, lines, "val", None, 19)
    _, mask, name = dataset[0]
    expected = np.asarray(Image.open(tiny_cityscapes_root / lines[0].split()[1]))
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert name.endswith("_leftImg8bit") and mask.shape == (24, 48)


def test_short_labeled_list_is_repeated_to_min_length(tiny_voc_root: Path) -> None:
    lines = read_split_file(tiny_voc_root / "train_l.txt")
    dataset = SemiSegDataset(tiny_voc_root, lines, "train_l", 32, 21, min_length=8)
    assert len(dataset) == 8
    assert [entry.image for entry in dataset.entries] == [
        parse_split_line(lines[i % 3]).image for i in range(8)
    ]
    longer = SemiSegDataset(tiny_voc_root, lines, "train_l", 32, 21, min_length=2)
    assert len(longer) == 3


# Errors --------------------------------------------------------------------------------------


def test_missing_data_root_raises_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data root not found: .*missing_root"):
        SemiSegDataset(tmp_path / "missing_root", ["JPEGImages/a.jpg"], "train_u", 32, 21)


def test_split_line_with_missing_image_or_mask_raises_naming_the_file(
    tiny_voc_root: Path,
) -> None:
    with pytest.raises(FileNotFoundError, match=r"image .* not found: .*ghost\.jpg"):
        SemiSegDataset(tiny_voc_root, ["JPEGImages/ghost.jpg"], "train_u", 32, 21)
    line = "JPEGImages/2007_000000.jpg SegmentationClass/ghost.png"
    with pytest.raises(FileNotFoundError, match=r"mask .* not found: .*ghost\.png"):
        SemiSegDataset(tiny_voc_root, [line], "train_l", 32, 21)


def test_labeled_mode_without_mask_path_raises(tiny_voc_root: Path) -> None:
    with pytest.raises(ValueError, match="needs a mask path.*2007_000000.jpg"):
        SemiSegDataset(tiny_voc_root, ["JPEGImages/2007_000000.jpg"], "val", None, 21)


def test_bad_mode_and_missing_crop_size_raise(tiny_voc_root: Path) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        SemiSegDataset(tiny_voc_root, ["JPEGImages/2007_000000.jpg"], "train", 32, 21)
    with pytest.raises(ValueError, match="needs a crop_size"):
        SemiSegDataset(tiny_voc_root, ["JPEGImages/2007_000000.jpg"], "train_u", None, 21)


def test_mask_with_out_of_range_labels_raises_at_load_naming_file_and_values(
    tiny_voc_root: Path, tmp_path: Path
) -> None:
    root = _copy_root(tiny_voc_root, tmp_path)
    path = root / "SegmentationClass" / "2007_000009.png"
    labels = np.asarray(Image.open(path)).copy()
    labels[0, :3] = [21, 40, 255]
    bad = Image.fromarray(labels)
    palette = Image.open(path).getpalette()
    assert palette is not None
    bad.putpalette(palette)
    bad.save(path)
    dataset = SemiSegDataset(root, root / "val.txt", "val", None, 21)
    assert dataset[1][2] == "2007_000010"
    with pytest.raises(ValueError, match=r"2007_000009\.png: labels \[21, 40\] out of range"):
        dataset[0]


def test_rgb_mask_is_rejected_with_its_mode(tiny_voc_root: Path, tmp_path: Path) -> None:
    root = _copy_root(tiny_voc_root, tmp_path)
    path = root / "SegmentationClass" / "2007_000000.png"
    Image.open(path).convert("RGB").save(path)
    dataset = SemiSegDataset(root, root / "train_l.txt", "train_l", 32, 21)
    with pytest.raises(ValueError, match="2007_000000.png: a mask must be .* got mode 'RGB'"):
        dataset[0]


# Own datasets --------------------------------------------------------------------------------


def test_custom_spec_takes_its_classes_from_the_flags_and_the_rest_from_voc() -> None:
    spec = dataset_spec(CUSTOM, class_names=["sky", "tree", "road"])
    voc = DATASETS["voc"]
    assert spec.num_classes == 3 and spec.class_names == ("sky", "tree", "road")
    assert (spec.hflip, spec.crop_size, spec.eval_mode, spec.ignore_index) == (
        voc.hflip,
        voc.crop_size,
        voc.eval_mode,
        255,
    )
    named = dataset_spec(CUSTOM, 4, hflip=False, crop_size=96, eval_mode="sliding", ignore_index=4)
    assert named.class_names == ("class_0", "class_1", "class_2", "class_3")
    assert (named.hflip, named.crop_size, named.eval_mode, named.ignore_index) == (
        False,
        96,
        "sliding",
        4,
    )


def test_registered_spec_keeps_its_names_unless_the_class_count_changes() -> None:
    assert dataset_spec("voc") == DATASETS["voc"]
    assert dataset_spec("voc", num_classes=21).class_names == VOC_CLASSES
    assert dataset_spec("cityscapes", num_classes=2).class_names == ("class_0", "class_1")
    assert dataset_spec("demo", hflip=True).hflip and not DATASETS["demo"].hflip


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "needs its classes"),
        ({"num_classes": 3, "class_names": ["a", "b"]}, "2 class names for 3 classes"),
        ({"class_names": ["a", "a"]}, "distinct and non-blank"),
        ({"class_names": ["a", " "]}, "distinct and non-blank"),
        ({"num_classes": 3, "ignore_index": 2}, "ignore_index must lie in 3..255"),
        ({"num_classes": 3, "ignore_index": 256}, "ignore_index must lie in 3..255"),
        ({"num_classes": 3, "eval_mode": "tiles"}, "eval_mode must be one of"),
        ({"num_classes": 3, "crop_size": 0}, "crop_size must be >= 1"),
    ],
)
def test_bad_custom_spec_raises_value_error_naming_the_problem(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        dataset_spec(CUSTOM, **kwargs)


def test_unknown_dataset_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'ade'.*'custom'"):
        dataset_spec("ade")


def test_class_names_come_from_a_file_of_one_name_a_line_or_the_values(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("background\n  traffic light \n\ncar\n")
    assert read_class_names([str(path)]) == ("background", "traffic light", "car")
    assert read_class_names(["a", " b"]) == ("a", "b")
    assert read_class_names([str(tmp_path / "absent.txt")]) == (str(tmp_path / "absent.txt"),)


def test_spec_from_run_args_rebuilds_the_run_spec_and_old_runs_get_the_defaults() -> None:
    spec = dataset_spec(CUSTOM, class_names=["a", "b"], ignore_index=200, hflip=False)
    recorded = {"dataset": CUSTOM, **spec._asdict()}
    assert spec_from_run_args(recorded) == spec
    assert spec_from_run_args({"dataset": "cityscapes"}) == DATASETS["cityscapes"]


def test_own_ignore_value_reads_as_255_and_the_old_255_is_then_out_of_range(
    tiny_voc_root: Path, tmp_path: Path
) -> None:
    root = _copy_root(tiny_voc_root, tmp_path)
    path = root / "SegmentationClass" / "2007_000009.png"
    labels = np.asarray(Image.open(path)) % 3
    labels[:2] = 7
    Image.fromarray(labels.astype(np.uint8)).save(path)
    line = "JPEGImages/2007_000009.jpg SegmentationClass/2007_000009.png"
    _, mask, _ = SemiSegDataset(root, [line], "val", None, 3, ignore_index=7)[0]
    expected = np.where(labels == 7, 255, labels)
    assert np.array_equal(mask.numpy(), expected) and (mask == 255).sum() == 2 * labels.shape[1]
    labels[0, 0] = 255
    Image.fromarray(labels.astype(np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"labels \[255\] out of range for 3 classes.*7 = ignore"):
        SemiSegDataset(root, [line], "val", None, 3, ignore_index=7)[0]
    with pytest.raises(ValueError, match="ignore_index must be in 3..255"):
        SemiSegDataset(root, [line], "val", None, 3, ignore_index=1)


def test_denormalize_inverts_normalize_for_display() -> None:
    from ddfp_examples.transforms import denormalize, normalize

    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    shown = denormalize(normalize(Image.fromarray(pixels)))
    assert shown.shape == (5, 7, 3)
    assert torch.allclose(shown, torch.from_numpy(pixels).float() / 255, atol=1e-6)
