"""Which DDFP direction helps? The demo on its tuning split, per direction rule and seed.

Four variants of the loop's DDFP stream (``--fp ddfp``), everything else the loop's demo default:

- ``ddfp_default``: the reference direction, the head as it is in training (Dropout on, BatchNorm
  on batch statistics), so the direction is random and reaches every pixel of the batch;
- ``ddfp_deterministic``: ``--ddfp-head-mode batch_stats``, Dropout off in the gradient pass;
- ``ddfp_local``: ``--ddfp-min-grad-ratio R``, only pixels whose gradient norm is at least ``R``
  times the median over the confident pixels move;
- ``random_direction``: DDFP's step size in a random direction, the control.

Each variant runs on ``--split tuning`` of :mod:`studies.ssl_demo` (held-out *training* images as
the validation split, so that choosing a variant never looks at the demo's val split), with the
same seeds for every variant; differences are read seed by seed against ``ddfp_default``. Runs are
:func:`studies.ssl_demo.run_one` calls, so they are resume-safe and reuse finished runs. Writes
``benchmarks/results/ddfp_direction_study.json``.

    python -m studies.ddfp_direction_study                    # 4 variants x 3 seeds
    python -m studies.ddfp_direction_study --dry-run          # print the loop commands only
    python -m studies.ddfp_direction_study --min-grad-ratio 0.05 --seeds 0
    python -m studies.ddfp_direction_study --previous-results benchmarks/results/ddfp_direction_study.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from ddfp_examples.demo_data import DEMO_NUM_LABELED  # noqa: E402

from benchmarks.common import REPO_ROOT, write_results  # noqa: E402
from studies import ssl_demo  # noqa: E402

__all__ = [
    "BASELINE",
    "CANDIDATES",
    "DECISION_RULE",
    "RESULTS_NAME",
    "PlannedRun",
    "decide",
    "direction_methods",
    "main",
    "parse_args",
    "plan",
]

RESULTS_NAME = "ddfp_direction_study"
DEFAULT_RUNS_DIR = REPO_ROOT / "runs" / RESULTS_NAME
#: The variant every other one is compared with, seed by seed.
BASELINE = "ddfp_default"
LABELS = {
    "ddfp_default": "DDFP (reference direction)",
    "ddfp_deterministic": "DDFP, no dropout in the gradient pass",
    "ddfp_local": "DDFP, only pixels with a large gradient",
    "random_direction": "random direction of DDFP's size",
}


#: Variants that may replace the reference direction as the default (the random direction is the
#: control, not a candidate).
CANDIDATES = ("ddfp_deterministic", "ddfp_local")
DECISION_RULE = (
    "a variant replaces the reference direction as the default only if it is better on every "
    "seed of the tuning split (and then the one with the largest mean difference)"
)


def decide(paired: list[dict[str, Any]]) -> dict[str, Any]:
    """The default the study leads to, by :data:`DECISION_RULE`.

    Args:
        paired: :func:`studies.ssl_demo.paired_differences` rows against :data:`BASELINE`.

    Returns:
        ``rule``, ``default`` (the method to adopt: :data:`BASELINE` unless a candidate qualifies)
        and ``qualified`` (the candidates that are better on every seed, best first).
    """
    qualified = sorted(
        (
            row
            for row in paired
            if row["method"] in CANDIDATES
            and row["baseline"] == BASELINE
            and row["seeds"]
            and row["wins"] == len(row["seeds"])
        ),
        key=lambda row: -row["mean_difference"],
    )
    return {
        "rule": DECISION_RULE,
        "default": qualified[0]["method"] if qualified else BASELINE,
        "qualified": [row["method"] for row in qualified],
    }


def direction_methods(min_grad_ratio: float) -> dict[str, tuple[str, ...]]:
    """The loop flags of each variant; ``min_grad_ratio`` is the one of ``ddfp_local``."""
    return {
        "ddfp_default": ("--fp", "ddfp"),
        "ddfp_deterministic": ("--fp", "ddfp", "--ddfp-head-mode", "batch_stats"),
        "ddfp_local": ("--fp", "ddfp", "--ddfp-min-grad-ratio", str(min_grad_ratio)),
        "random_direction": ("--fp", "ddfp", "--perturbation", "random_direction"),
    }


@dataclass(frozen=True)
class PlannedRun:
    """One run of the study: which variant, seed and folder, and the loop command it takes."""

    method: str
    num_labeled: int
    seed: int
    out: Path
    command: tuple[str, ...]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--methods", nargs="+", choices=list(LABELS), default=list(LABELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--num-labeled", type=int, default=DEMO_NUM_LABELED, help="labelled demo images"
    )
    parser.add_argument(
        "--min-grad-ratio",
        type=float,
        default=0.1,
        help="--ddfp-min-grad-ratio of the ddfp_local variant",
    )
    parser.add_argument(
        "--heldout", type=int, default=300, help="training images held out as the tuning split"
    )
    parser.add_argument("--threads", type=int, default=ssl_demo.StudyBudget.threads)
    parser.add_argument("--workers", type=int, default=ssl_demo.StudyBudget.workers)
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=ssl_demo.StudyBudget.device
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="demo dataset (default: the loop's cache)"
    )
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="default: benchmarks/results"
    )
    parser.add_argument(
        "--previous-results",
        type=Path,
        default=None,
        help="an earlier results JSON of this study at the same budget: its runs count as "
        "finished where their folders are gone",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: tabulate the runs that have finished (or are recorded) and list the "
        "others as not run",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the loop command of every run and stop"
    )
    args = parser.parse_args(argv)
    if not args.min_grad_ratio > 0:
        parser.error(f"--min-grad-ratio must be > 0, got {args.min_grad_ratio}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ from each other, got {args.seeds}")
    return args


def budget_of(args: argparse.Namespace) -> ssl_demo.StudyBudget:
    """ssl_demo's default budget (the loop's demo command), with this study's machine options."""
    return ssl_demo.StudyBudget(threads=args.threads, workers=args.workers, device=args.device)


def plan(args: argparse.Namespace, data_root: Path) -> list[PlannedRun]:
    """Every run of the study, seed-major so that a cut-short study has whole seeds.

    Args:
        args: from :func:`parse_args`.
        data_root: the tuning copy of the demo the runs read.

    Returns:
        One :class:`PlannedRun` per (seed, method), each in its own folder under ``args.runs_dir``.
    """
    methods = direction_methods(args.min_grad_ratio)
    budget = budget_of(args)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            out = ssl_demo.run_dir(args.runs_dir, method, args.num_labeled, seed)
            command = ssl_demo.loop_command(
                method, args.num_labeled, seed, out, budget, data_root, methods=methods
            )
            runs.append(PlannedRun(method, args.num_labeled, seed, out, tuple(command)))
    return runs


def prepare_tuning_data(args: argparse.Namespace) -> Path:
    """The demo (generated when missing) and its held-out copy under the runs folder."""
    from ddfp_examples.demo_data import default_demo_root, make_demo_dataset

    budget = budget_of(args)
    demo_root = make_demo_dataset(args.data_root or default_demo_root(), *budget.demo_size)
    tuning_root = Path(args.runs_dir) / "tuning_data"
    ssl_demo.carve_tuning_split(demo_root, tuning_root, args.heldout)
    return tuning_root


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the study and write its JSON; return the JSON's ``"results"``."""
    args = parse_args(argv)
    if args.dry_run:
        for run in plan(args, Path(args.data_root or "<tuning data>")):
            print(shlex.join(run.command[1:]))
        return {}
    weights = ssl_demo.require_backbone_weights()
    data_root = prepare_tuning_data(args)
    runs_planned = plan(args, data_root)
    methods = direction_methods(args.min_grad_ratio)
    budget = budget_of(args)
    recorded = ssl_demo.recorded_runs(
        args.previous_results,
        {
            "split": "tuning",
            "heldout": args.heldout,
            "num_labeled": args.num_labeled,
            "budget.epochs": budget.epochs,
            "budget.iters_per_epoch": budget.iters_per_epoch,
            "budget.batch_size": budget.batch_size,
            "budget.device": budget.device,
        },
        {m: methods[m] for m in args.methods},
    )
    runs, missing = [], []
    start = time.time()
    for index, planned in enumerate(runs_planned, 1):
        key = (planned.method, planned.num_labeled, planned.seed)
        done = ssl_demo.finished(planned.out)
        if args.finished_only and not done and key not in recorded:
            missing.append({"method": planned.method, "seed": planned.seed})
            print(f"[{index}/{len(runs_planned)}] {planned.method} seed={planned.seed}: not run")
            continue
        if not done and key in recorded:
            runs.append(recorded[key])
            print(
                f"[{index}/{len(runs_planned)}] {planned.method} seed={planned.seed}: mIoU "
                f"{100 * runs[-1]['final_miou']:.2f} (recorded in {args.previous_results})",
                flush=True,
            )
            continue
        run = ssl_demo.run_one(
            planned.method,
            planned.num_labeled,
            planned.seed,
            args.runs_dir,
            budget,
            data_root,
            methods,
        )
        runs.append(run)
        print(
            f"[{index}/{len(runs_planned)}] {planned.method} seed={planned.seed}: mIoU "
            f"{100 * run['final_miou']:.2f} ({'reused' if run['reused'] else 'ran'}, "
            f"{time.time() - start:.0f} s so far)",
            flush=True,
        )
    labels = {m: LABELS[m] for m in args.methods}
    table = ssl_demo.aggregate(runs, labels)
    paired = (
        ssl_demo.paired_differences(runs, BASELINE, args.methods)
        if BASELINE in args.methods
        else []
    )
    results = {
        "setup": {
            "split": "tuning",
            "data_root": str(data_root),
            "heldout": args.heldout,
            "methods": {m: list(methods[m]) for m in args.methods},
            "num_labeled": args.num_labeled,
            "seeds": args.seeds,
            "budget": {
                "epochs": budget.epochs,
                "iters_per_epoch": budget.iters_per_epoch,
                "batch_size": budget.batch_size,
                "threads_per_run": budget.threads,
                "device": budget.device,
            },
            "score": "mIoU after the last epoch on held-out training images",
            "wall_seconds": time.time() - start,
            "backbone_weights": weights,
            "previous_results": None
            if args.previous_results is None
            else str(args.previous_results),
        },
        "table": table,
        "paired_vs_baseline": paired,
        "decision": decide(paired),
        "runs": runs,
        "not_run": missing,
    }
    path = write_results(RESULTS_NAME, results, args.results_dir)
    for row in table:
        print(f"{row['label']:<42} {100 * row['mean_miou']:.2f} ± {100 * row['std_miou']:.2f}")
    for row in paired:
        print(
            f"{LABELS[row['method']]:<42} {100 * row['mean_difference']:+.2f} against "
            f"{LABELS[BASELINE]} ({row['wins']}/{len(row['seeds'])} seeds won)"
        )
    print(f"default direction: {LABELS[results['decision']['default']]} ({DECISION_RULE})")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
