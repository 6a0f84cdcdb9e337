"""examples/density_2d.py, examples/predict.py and examples/visualize_predictions.py."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ddfp_lib import FlowDensityEstimator
from ddfp_lib.training import feature_rows_and_labels

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def density_2d():
    return load_example("density_2d")


# ---------------------------------------------------------------------------------- density_2d
def test_two_moons_are_balanced_with_exactly_the_asked_labelled_points_per_class(density_2d):
    data = density_2d.make_two_moons(num_points=100, labeled_per_class=4, seed=3)
    assert data.points.shape == (100, 2) and data.test_points.shape == (100, 2)
    assert torch.bincount(data.classes).tolist() == [50, 50]
    assert torch.bincount(data.classes[data.labeled]).tolist() == [4, 4]
    again = density_2d.make_two_moons(num_points=100, labeled_per_class=4, seed=3)
    assert torch.equal(again.points, data.points) and torch.equal(again.labeled, data.labeled)
    labels = data.flow_labels()
    assert torch.equal(labels[data.labeled], data.classes[data.labeled])
    assert (labels[~data.labeled] == -1).all()


def test_points_reach_the_flow_trainer_as_rows_in_their_own_order(density_2d):
    data = density_2d.make_blobs(num_points=30, seed=1)
    labels = data.flow_labels()
    rows, row_labels, valid = feature_rows_and_labels(
        density_2d.as_feature_map(data.points), density_2d.as_label_map(labels), num_classes=3
    )
    assert torch.equal(rows, data.points)
    assert torch.equal(row_labels, labels) and bool(valid.all())


def test_boundary_log_density_averages_the_flow_over_the_points_where_classes_tie(density_2d):
    classifier = torch.nn.Linear(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        classifier.bias.zero_()
    estimator = FlowDensityEstimator(dim=2, num_classes=2, hidden_dim=8, seed=0)
    rows = torch.tensor([[0.0, -1.0], [0.0, 2.0], [3.0, 0.0], [-3.0, 1.0]])
    with torch.no_grad():
        expected = float(estimator.log_prob(rows[:2]).mean())
    assert density_2d.boundary_log_density(classifier, estimator, rows) == pytest.approx(expected)


def test_short_toy_run_trains_the_flow_and_its_arrows_descend_the_learned_density(
    density_2d, tmp_path
):
    out = tmp_path / "toy.png"
    results = density_2d.run(
        flow_steps=80,
        supervised_steps=60,
        consistency_steps=20,
        out=out,
        grid_steps=40,
        controls=False,
    )
    assert results["png"] == str(out) and out.read_bytes()[:8] == PNG_SIGNATURE
    assert results["flow_nll_end"] < results["flow_nll_start"] - 0.5
    assert results["confident_fraction"] > 0.3
    assert results["descending_fraction"] > 0.8
    assert results["mean_log_density_drop"] > 0.0
    assert 0.5 <= results["accuracy_before"] <= 1.0 and 0.5 <= results["accuracy_after"] <= 1.0
    assert "accuracy_after_pseudo_labels" not in results


def test_blobs_run_without_a_figure_writes_nothing(density_2d, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = density_2d.run(
        "blobs", flow_steps=30, supervised_steps=30, consistency_steps=5, out=None, controls=False
    )
    assert results["png"] is None and list(tmp_path.iterdir()) == []
    assert results["flow_nll_end"] < results["flow_nll_start"]


def test_unknown_toy_dataset_is_a_clear_error(density_2d):
    with pytest.raises(ValueError, match="moons"):
        density_2d.run("spirals", out=None)


@pytest.mark.slow
def test_default_toy_run_moves_the_boundary_to_lower_density_and_beats_both_controls(density_2d):
    results = density_2d.run(out=None)
    assert results["accuracy_after"] > results["accuracy_before"] + 0.05
    assert results["accuracy_after"] > results["accuracy_after_pseudo_labels"] + 0.03
    assert results["accuracy_after"] > results["accuracy_after_random_direction"] + 0.03
    assert results["boundary_log_density_after"] < results["boundary_log_density_before"]
    assert results["descending_fraction"] > 0.95
    page = (ROOT / "docs" / "ddfp-in-5-minutes.md").read_text()
    quoted = [float(x) / 100 for x in re.findall(r"^\|[^|]+\| (\d+\.\d) % \|$", page, flags=re.M)]
    keys = ("before", "after", "after_pseudo_labels", "after_random_direction")
    measured = [results[f"accuracy_{key}"] for key in keys]
    assert quoted == pytest.approx(measured, abs=0.01), "update the table of ddfp-in-5-minutes.md"


# ------------------------------------------------------------------- checkpoints of the loop
def build_model(num_classes: int = 21):
    from ddfp_examples.models import build_deeplabv3plus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_deeplabv3plus("mobilenet_v2", num_classes)


def save_loop_checkpoint(path: Path, data_root: Path, with_flow: bool = True) -> Path:
    """A fresh model in the format of the loop's best.pt / latest.pt."""
    torch.manual_seed(0)
    model = build_model()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.linspace(-1.0, 1.0, 21))
    args = {
        "dataset": "voc",
        "backbone": "mobilenet_v2",
        "crop_size": 32,
        "data_root": data_root,
        "val_list": data_root / "val.txt",
        "eps": 4.0,
        "threshold": 0.0,
        "aux_bn": False,
    }
    checkpoint = {"model": model.state_dict(), "args": args, "progress": {"iteration": 0}}
    if with_flow:
        checkpoint["flow"] = FlowDensityEstimator(256, 21, seed=0).state_dict()
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_voc_root, tmp_path_factory):
    return save_loop_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", tiny_voc_root)


@functools.lru_cache(maxsize=2)
def reference_model(checkpoint_path: Path):
    model = build_model()
    model.load_state_dict(torch.load(checkpoint_path, weights_only=False)["model"])
    return model.eval()


def reference_prediction(checkpoint_path: Path, image) -> np.ndarray:
    """Argmax of the checkpoint's model on a PIL image, rebuilt without the scripts' helpers."""
    from ddfp_examples.transforms import normalize

    model = reference_model(checkpoint_path)
    with torch.no_grad():
        return model(normalize(image.convert("RGB"))[None])[0].argmax(dim=0).numpy()


def test_voc_palette_has_the_pascal_colours():
    from ddfp_examples.transforms import voc_palette

    palette = np.array(voc_palette()).reshape(256, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]  # aeroplane
    assert palette[2].tolist() == [0, 128, 0]  # bicycle
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # ignore
    assert len({tuple(c) for c in palette[:21].tolist()}) == 21


def test_predict_writes_one_palette_png_per_image_with_the_models_argmax(checkpoint, tmp_path):
    from PIL import Image

    predict = load_example("predict")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(images / "b.jpg")
    (images / "notes.txt").write_text("not an image")

    written = predict.main([str(checkpoint), str(images), "--out", str(tmp_path / "out")])

    assert [p.name for p in written] == ["a.png", "b.png"]
    for source, target in zip(sorted(images.glob("*.*g")), written):
        with Image.open(source) as image, Image.open(target) as mask:
            assert mask.mode == "P" and mask.size == image.size
            assert mask.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
            np.testing.assert_array_equal(np.array(mask), reference_prediction(checkpoint, image))


def test_predict_rejects_a_file_that_is_not_a_loop_checkpoint(tmp_path):
    predict = load_example("predict")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'model' and 'args'"):
        predict.load_trained_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict.load_trained_model(tmp_path / "nowhere.pt")


def test_visualization_shows_the_models_prediction_and_a_density_drop_on_confident_pixels(
    checkpoint, tmp_path
):
    from PIL import Image

    visualize = load_example("visualize_predictions")
    out = tmp_path / "grid.png"
    result = visualize.visualize(checkpoint, out, num_images=2)

    assert result["png"] == str(out) and out.read_bytes()[:8] == PNG_SIGNATURE
    assert result["has_flow"] and len(result["columns"]) == 6
    assert [entry["id"] for entry in result["images"]] == ["2007_000009", "2007_000010"]
    root = torch.load(checkpoint, weights_only=False)["args"]["data_root"]
    for entry in result["images"]:
        with Image.open(root / "JPEGImages" / f"{entry['id']}.jpg") as image:
            expected = reference_prediction(checkpoint, image)
        np.testing.assert_array_equal(entry["prediction"].numpy(), expected)
        assert entry["confident_fraction"] == 1.0  # the checkpoint's threshold is 0
        assert entry["mean_density_drop"] > 0.0
        assert entry["descending_fraction"] > 0.9


def test_checkpoint_without_a_flow_gets_the_first_four_columns_only(tiny_voc_root, tmp_path):
    visualize = load_example("visualize_predictions")
    no_flow = save_loop_checkpoint(tmp_path / "no_flow.pt", tiny_voc_root, with_flow=False)
    result = visualize.visualize(no_flow, tmp_path / "plain.png", num_images=1)
    assert not result["has_flow"] and "mean_density_drop" not in result["images"][0]
    assert result["columns"][:3] == ["image", "ground truth", "prediction"]
    assert len(result["columns"]) == 4
    assert (tmp_path / "plain.png").read_bytes()[:8] == PNG_SIGNATURE


def test_density_drop_is_zero_where_no_pixel_is_confident(checkpoint):
    visualize = load_example("visualize_predictions")
    trained = load_example("predict").load_trained_model(checkpoint)
    image = torch.randn(3, 32, 40)
    analysis = visualize.analyse_image(trained, image, threshold=1.1, eps=4.0)
    assert not analysis["confident"].any()
    assert torch.equal(analysis["log_density"], analysis["log_density_pushed"])


@pytest.mark.slow
def test_checkpoint_of_one_loop_iteration_feeds_predict_and_visualize(tiny_voc_root, tmp_path):
    loop = load_example("voc_unimatch_plus_ddfp")
    root = tiny_voc_root
    loop.main(
        [
            "--dataset", "voc", "--data-root", str(root),
            "--labeled-list", str(root / "train_l.txt"),
            "--unlabeled-list", str(root / "train_u.txt"), "--val-list", str(root / "val.txt"),
            "--backbone", "mobilenet_v2", "--crop-size", "32", "--batch-size", "2",
            "--epochs", "1", "--iters-per-epoch", "1", "--workers", "0", "--no-progress",
            "--threshold", "0.0", "--fp", "ddfp", "--out", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    best = tmp_path / "run" / "best.pt"
    result = load_example("visualize_predictions").visualize(best, tmp_path / "grid.png", 1)
    assert result["has_flow"] and result["images"][0]["mean_density_drop"] > 0.0
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((root / "JPEGImages").glob("*.jpg"))[:2]:
        (images / path.name).write_bytes(path.read_bytes())
    written = load_example("predict").main(
        [str(best), str(images), "--out", str(tmp_path / "masks")]
    )
    assert len(written) == 2 and all(p.read_bytes()[:8] == PNG_SIGNATURE for p in written)
