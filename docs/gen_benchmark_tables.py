"""Write docs/benchmarks.md and its plots from the result files in benchmarks/results/.

    python docs/gen_benchmark_tables.py            # rewrite docs/benchmarks.md and docs/assets/bench_*.png
    python docs/gen_benchmark_tables.py --check    # exit 1 if docs/benchmarks.md differs from the JSON

The page is a pure function of the JSON files, so ``--check`` (run by the tests) catches a page that
was not regenerated after a benchmark run. Every ``<name>.json`` gets a section: a table (and a plot
for the timings) for the benchmarks this script knows, the command, date and machine for any other.
Result files of quick runs (``*_quick*.json``) are left out: they check that a script runs, they
do not measure anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "ASSETS_DIR",
    "PAGE",
    "RESULTS_DIR",
    "load_results",
    "main",
    "plot_path",
    "render_page",
    "write_plots",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
ASSETS_DIR = ROOT / "docs" / "assets"

Result = tuple[str, dict[str, Any]]

HEADER = """# Benchmarks

<!-- Written by docs/gen_benchmark_tables.py from benchmarks/results/*.json: edit those, not this. -->

Two kinds of numbers live here. DDFP's accuracy on Pascal VOC and Cityscapes is the paper's:
training a ResNet-101 for 80 epochs on 4 GPUs per split is beyond what this repository reruns.
Everything after it is measured by the scripts in `benchmarks/` (`benchmarks/README.md` says how
to run them and what each one measures): a small accuracy study of the example loop on the built-in
demo data, and the cost of every piece of the library. Their raw results, every repeat included,
are the JSON files in `benchmarks/results/`; regenerate this page after a benchmark run with
`python docs/gen_benchmark_tables.py`.

## Accuracy reported in the paper

mIoU (%) with DeepLabV3+ on ResNet-101, best epoch, as reported by Wang et al. (CVPR 2024) for DDFP
and for UniMatch (Yang et al., CVPR 2023), the loop `examples/voc_unimatch_plus_ddfp.py` builds on.

| Pascal VOC 2012, labelled images | 92 | 183 | 366 | 732 | 1464 |
|---|---|---|---|---|---|
| UniMatch | **75.2** | 77.2 | 78.8 | 79.9 | 81.2 |
| DDFP | 75.0 | **78.0** | **79.5** | **81.2** | **82.0** |

| Cityscapes, labelled images | 186 (1/16) | 372 (1/8) | 744 (1/4) |
|---|---|---|---|
| UniMatch | 76.6 | 77.9 | 79.2 |
| DDFP | **77.1** | **78.2** | **79.9** |

The paper's training logs put the full DDFP iteration at about 10 % slower than the same loop
without the perturbation branch; the measurements below say what each part costs here.
"""

EMPTY = """
## Measurements

No result files yet: run a script of `benchmarks/` (for example
`python benchmarks/perturbation_family.py`), then `python docs/gen_benchmark_tables.py`.
"""


def load_results(results_dir: Path = RESULTS_DIR) -> list[Result]:
    """Every non-quick ``*.json`` of ``results_dir`` as ``(file stem, payload)``, sorted by stem."""
    if not results_dir.is_dir():
        return []
    results = []
    for path in sorted(results_dir.glob("*.json")):
        if "_quick" in path.stem:
            continue
        results.append((path.stem, json.loads(path.read_text())))
    return results


def plot_path(stem: str, assets_dir: Path = ASSETS_DIR) -> Path:
    """Where the plot of the result file ``<stem>.json`` goes."""
    return assets_dir / f"bench_{stem}.png"


def _machine(payload: dict[str, Any]) -> str:
    machine = payload.get("machine") or {}
    parts = [
        str(machine[key])
        for key in ("cuda_device", "cpu", "platform")
        if machine.get(key) and not (key == "platform" and machine.get("cpu"))
    ]
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} cores")
    if machine.get("torch_threads"):
        parts.append(f"{machine['torch_threads']} torch threads")
    torch_version = machine.get("torch") or payload.get("torch")
    if torch_version:
        parts.append(f"torch {torch_version}")
    device = machine.get("device") or payload.get("device")
    if device:
        parts.append(f"device {device}")
    return ", ".join(parts) or "not recorded"


def _provenance(payload: dict[str, Any]) -> str:
    command = payload.get("command", "not recorded")
    date = payload.get("date", "not recorded")
    return f"Command `{command}`, run {date}; machine: {_machine(payload)}."


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _perturbation_family(stem: str, payload: dict[str, Any]) -> str:
    rows = []
    for entry in payload["results"]:
        times = entry["times_s"]
        rows.append(
            [
                f"`{entry['name']}`" if "(" not in entry["name"] else entry["name"],
                _ms(entry["median_s"]),
                f"{_ms(min(times))} - {_ms(max(times))}",
                f"{entry['head_forwards']:.2f}",
            ]
        )
    shape = " x ".join(str(n) for n in payload["features_shape"])
    text = (
        f"One call of every perturbation of the family on decoder inputs `v` of shape {shape}, "
        f"median of {payload['repeats']} calls after a warm-up. The head is {payload['head']}; "
        "DDFP's flow is the default 256-d, 21-class estimator. The last column divides by one "
        "training-mode forward pass of the head.\n\n"
        + _table(["perturbation", "median ms", "min - max ms", "x head forward"], rows)
    )
    precision = payload.get("vat_float32_vs_float64_cosine_by_xi")
    if precision:
        cells = [[str(xi), f"{cosine:.4f}"] for xi, cosine in precision.items()]
        text += (
            "\n\nVAT's direction in float32 against float64 (cosine) for each probe length xi:\n\n"
            + _table(["xi", "cosine"], cells)
        )
    return text + f"\n\n![Time per call of every perturbation](assets/{plot_path(stem).name})"


def _seconds(value: float) -> str:
    return f"{value:.3g}"


def _clocks(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{clock: timings}`` of one configuration of train_step."""
    return {c: entry[c] for c in ("wall", "cpu") if c in entry}


def _split_source(configs: dict[str, Any]) -> str:
    """Where a train_step file's DDFP split is: ``"profile"`` (torch.profiler), or, in files
    from before it, the clock that timed it inside the iterations (the CPU clock when there)."""
    if any("profile" in entry for entry in configs.values()):
        return "profile"
    return "cpu" if "cpu" in _clocks(next(iter(configs.values()))) else "wall"


def _train_step(stem: str, payload: dict[str, Any]) -> str:
    results = payload["results"]
    setup, configs = results["setup"], results["configs"]
    clocks = list(_clocks(next(iter(configs.values()))))
    source = _split_source(configs)
    split_parts: list[str] = []
    for entry in configs.values():
        split_parts = split_parts or list(entry.get(source, {}).get("split", {}))
    unit = "profiler" if source == "profile" else source
    header = ["streams (`--fp`)"]
    header += [f"{clock} s per iteration, median (IQR)" for clock in clocks]
    header += [f"{part.replace('_', ' ')}, {unit} s (share)" for part in split_parts]
    rows = []
    for fp, entry in configs.items():
        row = [f"`{fp}`"]
        for clock in clocks:
            step = entry[clock]["step"]
            row.append(f"{_seconds(step['median'])} ({_seconds(step['iqr'])})")
        split = entry.get(source, {})
        for part in split_parts:
            if "split" in split:
                share = split["split_share_of_step"][part]
                row.append(f"{_seconds(split['split'][part]['median'])} ({100 * share:.1f} %)")
            else:
                row.append("")
        rows.append(row)
    overhead_lines = [
        ("- profiler: " if clock == "profile" else f"- {clock} clock: ")
        + ", ".join(
            f"{name.replace('_', ' ')} {100 * value:+.1f} %" for name, value in found.items()
        )
        for clock, found in results.get("overhead", {}).items()
        if found
    ]
    if len(clocks) > 1:
        clock_text = (
            "The CPU clock counts this process's own CPU time and is the steadier of the two on a "
            "shared machine."
        )
    else:
        clock_text = f"Clock: {setup['clocks'][clocks[0]]}."
    if "split" in setup:
        clock_text += f" {setup['split']}"
    text = (
        f"One iteration of the example loop (`train_step`: views, forward, losses, backward, "
        f"SGD step and, with DDFP, the flow's online step) with a {setup['backbone']} backbone "
        f"({setup.get('backbone_init', 'random')} init), crop {setup['crop_size']}, "
        f"{setup['labeled_per_iteration']} labelled + {setup['unlabeled_per_iteration']} "
        f"unlabelled images, AMP {setup.get('amp', 'none')}, {setup['repeats']} interleaved "
        "rounds. `none`: UniMatch's strong views only; `dropout`: UniMatch; `ddfp`: DDFP in place "
        f"of UniMatch's dropout stream; `both`: UniMatch + DDFP. {clock_text}\n\n"
        + _table(header, rows)
    )
    if overhead_lines:
        text += (
            "\n\nRelative cost of the DDFP stream (`split_<fp>`: DDFP's three parts over the "
            "rest of the same iterations):\n\n" + "\n".join(overhead_lines)
        )
    return text + f"\n\n![Time per iteration](assets/{plot_path(stem).name})"


def _perturbation_designs(stem: str, payload: dict[str, Any]) -> str:
    results = payload["results"]
    text = (
        "DDFP's perturbation step (`delta` for a decoder input, fuse block and flow) as this "
        "library computes it, against the design of the public reference code, on the same "
        "weights and mask; peak memory is measured in a fresh process per configuration."
    )
    targets = results.get("targets_b4_h129") or []
    if targets:
        rows = [
            [
                f"`{row['design']}`",
                str(row["num_classes"]),
                f"{row['density']:g}",
                f"{row['speedup']:.2f}x",
                f"{row['memory_ratio']:.2f}x",
                f"{row['cosine']:.6f}",
            ]
            for row in targets
        ]
        text += (
            "\n\nPaper-sized input (4 crops of 513, `v` of 4 x 304 x 129 x 129); the confident "
            "fraction of pixels is the density column:\n\n"
            + _table(
                [
                    "design",
                    "classes",
                    "confident fraction",
                    "faster than reference",
                    "less peak memory",
                    "cosine of delta to reference",
                ],
                rows,
            )
        )
    exponents = (results.get("scaling") or {}).get("exponents") or {}
    if exponents:
        rows = [
            [
                f"`{design}`",
                "-" if fit.get("time_all") is None else f"{fit['time_all']:.2f}",
                "-" if fit.get("memory_all") is None else f"{fit['memory_all']:.2f}",
            ]
            for design, fit in exponents.items()
        ]
        text += (
            "\n\nScaling with the number of rows N (flow and prior only): fitted exponents of "
            "time ~ N^a and peak memory ~ N^b.\n\n"
            + _table(["design", "time exponent a", "memory exponent b"], rows)
            + f"\n\n![Time and memory against N](assets/{plot_path(stem).name})"
        )
    profile = results.get("profile") or {}
    if profile.get("variants"):
        text += "\n\n" + _profile_variants(profile)
    return text


VARIANT_NOTES = {
    "baseline": "`DensityDescendingPerturbation(estimator, eps)`, the default call",
    "channels_last": "fuse block and `v` in channels-last memory format",
    "compile_density": "`torch.compile` of the flow + prior",
    "bf16_head": "bfloat16 autocast (the flow stays float32)",
    "chunked": "`chunk_rows=16384`",
    "chunked_4096": "`chunk_rows=4096`",
    "chunked_4096_channels_last": "`chunk_rows=4096`, channels-last head",
}


def _profile_variants(profile: dict[str, Any]) -> str:
    batch, size, classes, density = profile["shape_b_h_k_density"]
    top = (profile.get("profiler") or {}).get("top_ops") or []
    lines = [
        f"Where the time goes and one optimisation pass, at B={batch}, H=W={size}, K={classes}, "
        f"{density:.0%} confident pixels (`--sections profile`). Heaviest operators of the "
        "default call by self CPU time: "
        + ", ".join(f"`{op['op']}` {op['self_ms'] / 1000:.2f} s" for op in top[:4])
        + ".",
        "",
    ]
    rows = []
    for name, result in profile["variants"].items():
        note = VARIANT_NOTES.get(name, name)
        if result.get("status") != "ok":
            rows.append([f"`{name}`", note, result.get("status", "-"), "-", "-", "-"])
            continue
        speedup = result.get("speedup_vs_baseline")
        memory = result.get("memory_ratio_vs_baseline")
        rows.append(
            [
                f"`{name}`",
                note,
                f"{result['time']['median']:.2f}",
                f"{result['memory']['peak_mib']:.0f}",
                "1.00x" if name == "baseline" else f"{speedup:.2f}x",
                "1.00x" if name == "baseline" else f"{memory:.2f}x",
            ]
        )
    lines.append(
        _table(
            ["variant", "what changes", "median s", "peak MiB", "faster", "less memory"],
            rows,
        )
    )
    timed_out = [n for n, r in profile["variants"].items() if r.get("status") == "timeout"]
    if timed_out:
        lines += [
            "",
            "A timeout is a variant whose first calls did not finish within the benchmark's limit "
            "(on CPUs without native bfloat16 instructions, bfloat16 convolutions are emulated).",
        ]
    return "\n".join(lines)


def _main_job_label(setup: dict[str, Any]) -> str:
    """The README's main job in a study of the demo (studies recorded before it was named ran
    DDFP alone in the dropout stream's place)."""
    main = setup.get("main_job", "unimatch_ddfp")
    return setup.get("labels", {}).get(main, main.replace("_", " "))


def _ssl_demo(stem: str, payload: dict[str, Any]) -> str:
    results = payload["results"]
    setup = results["setup"]
    paired = {(row["method"], row["num_labeled"]): row for row in results["paired_vs_baseline"]}
    baseline = next(iter(paired.values()))["baseline"] if paired else None
    baseline_label = next(
        (row["label"] for row in results["table"] if row["method"] == baseline), baseline
    )
    rows = []
    for row in results["table"]:
        pair = paired.get((row["method"], row["num_labeled"]))
        difference = "baseline" if row["method"] == baseline else "-"
        if pair is not None:
            difference = (
                f"{100 * pair['mean_difference']:+.2f} ± {100 * pair['std_difference']:.2f} "
                f"({pair['wins']}/{len(pair['seeds'])} seeds better)"
            )
        rows.append(
            [
                row["label"],
                str(row["num_labeled"]),
                f"{100 * row['mean_miou']:.2f} ± {100 * row['std_miou']:.2f}",
                ", ".join(f"{100 * v:.1f}" for v in row["miou"]),
                difference,
            ]
        )
    split = (
        "the demo's validation split"
        if setup["split"] == "reported"
        else "a held-out part of the training images (the split for choosing the recipe, the "
        "streams, eps and the labelled-set size)"
    )
    text = (
        "The example loop on the built-in digit scenes (MobileNetV2 DeepLabV3+ with ImageNet "
        "weights, CPU, the loop's demo recipe), every method with the same budget: "
        f"{'/'.join(str(n) for n in setup['iterations'])} iterations ({setup['epochs']} "
        f"epochs) of {setup['batch_size']} labelled + {setup['batch_size']} unlabelled images, "
        + (f"eps {setup['eps']:g}" if setup.get("eps") is not None else "the loop's default eps")
        + ", seeds "
        f"{', '.join(str(s) for s in setup['seeds'])}. Score: {setup['score']}, on {split}."
        + (
            " A seed fixes the labelled images, so methods are compared seed by seed against "
            f"{baseline_label}."
            if baseline_label is not None
            else ""
        )
        + "\n\n"
        + _table(
            [
                "method",
                "labelled images",
                "mIoU % (mean ± std)",
                "per seed",
                f"minus {baseline_label}, same seeds" if baseline_label is not None else "-",
            ],
            rows,
        )
    )
    plot = Path(results.get("plot", ""))
    if plot.parent.name == "assets" and plot.parent.parent.name == "docs":
        text += f"\n\n![mIoU per method and labelled-set size](assets/{plot.name})"
    predictions = Path(results.get("predictions_plot") or "")
    if predictions.parent.name == "assets" and predictions.parent.parent.name == "docs":
        text += (
            "\n\nThe first val images, the ground truth, and the final models of supervised only and"
            f" {_main_job_label(setup)} at seed {min(setup['seeds'])}:\n\n"
            f"![val images, ground truth and predictions](assets/{predictions.name})"
        )
    return text


def _direction_study(stem: str, payload: dict[str, Any]) -> str:
    results = payload["results"]
    setup = results["setup"]
    paired = {row["method"]: row for row in results["paired_vs_baseline"]}
    baseline = next(iter(paired.values()))["baseline"] if paired else None
    labels = {row["method"]: row["label"] for row in results["table"]}
    rows = []
    for row in results["table"]:
        pair = paired.get(row["method"])
        difference = "baseline" if row["method"] == baseline else "-"
        if pair is not None:
            difference = (
                f"{100 * pair['mean_difference']:+.2f} ± {100 * pair['std_difference']:.2f} "
                f"({pair['wins']}/{len(pair['seeds'])} seeds better)"
            )
        flags = " ".join(setup["methods"][row["method"]])
        rows.append(
            [
                row["label"],
                f"`{flags}`",
                f"{100 * row['mean_miou']:.2f} ± {100 * row['std_miou']:.2f}",
                ", ".join(f"{100 * v:.1f}" for v in row["miou"]),
                difference,
            ]
        )
    text = (
        "Which DDFP direction trains best? UniMatch + DDFP (`--fp ddfp`, the loop's demo recipe, "
        f"{setup['num_labeled']} labelled images) on held-out training images "
        f"({setup['heldout']} of them, never the demo's val split), seeds "
        f"{', '.join(str(s) for s in setup['seeds'])}; each variant against "
        f"{labels.get(baseline, baseline)} at the same seed.\n\n"
        + _table(
            ["direction", "loop flags", "mIoU % (mean ± std)", "per seed", "minus the reference"],
            rows,
        )
    )
    decision = results.get("decision")
    if decision:
        text += (
            f"\n\nDecision rule: {decision['rule']}. Default: "
            f"{labels.get(decision['default'], decision['default'])}."
        )
    return text


def _share_cell(value: float | None) -> str:
    """A share as a percentage with two decimals; "-" for a share of no pixels."""
    return "-" if value is None else f"{100 * value:.2f}"


def _gradient_probe(stem: str, payload: dict[str, Any]) -> str:
    results = payload["results"]
    setup = results["setup"]
    rows = [
        [
            f"{row['min_grad_ratio']:g}",
            _share_cell(row["held_still"]),
            _share_cell(row["held_still_masked"]),
            _share_cell(row["held_still_unmasked"]),
            _share_cell(row["held_still_library"]),
        ]
        for row in results["ratios"]
    ]
    cosine = results["cosine"]
    return (
        f"DDFP's gradient on the decoder input of {setup['images']} unlabelled training images "
        f"({'x'.join(str(n) for n in results['feature_shape'])}), read off the final weights and "
        f"flow of `{setup['checkpoint']}`: {100 * results['confident_fraction']:.1f} % of the "
        "pixels are confident (the mask); the unmasked pixels' median gradient norm is "
        f"{results['unmasked_to_masked_median_norm']:.3f} times the masked pixels'. "
        "Pixels that `--ddfp-min-grad-ratio r` holds still (norm below r times the masked "
        "median), by plain autograd and by the library:\n\n"
        + _table(
            ["r", "% of all pixels", "% of masked", "% of unmasked", "% of all (library)"],
            rows,
        )
        + "\n\nPer-pixel cosine over the masked pixels between two reference directions (the "
        f"head's Dropout on): median {cosine['as_is_vs_as_is']['median']:.3f}, minimum "
        f"{cosine['as_is_vs_as_is']['min']:.3f}; between a reference direction and the one "
        f"without Dropout: median {cosine['as_is_vs_no_dropout']['median']:.3f}."
    )


def _flow_coupling(stem: str, payload: dict[str, Any]) -> str:
    results = payload["results"]
    flows = list(results["sizes"][0]["time"])
    rows = [
        [f"{size['rows']:,}"]
        + [
            f"{size['time'][name]['median']:.3f} (x{size['time_over_ddfp_lib'][name]:.2f})"
            for name in flows
        ]
        for size in results["sizes"]
    ]
    agreement = results.get("agreement_float64", {})
    worst = max(agreement.values()) if agreement else None
    text = (
        "The same Glow flow (2 coupling blocks, D = 256) and Gaussian-mixture prior in several "
        "flow libraries: seconds for `log p(x)` and its gradient with respect to `x`, median over "
        "round-robin repeats, and the ratio to ddfp_lib.\n\n"
        + _table(["rows N"] + [f"`{name}` s" for name in flows], rows)
    )
    if worst is not None:
        text += (
            f"\n\nIn float64 the other libraries agree with ddfp_lib to {worst:.1e} "
            "(largest absolute difference of log p or of its gradient)."
        )
    return text


def _vat_precision(stem: str, payload: dict[str, Any]) -> str:
    cells = [[xi, f"{cosine:.4f}"] for xi, cosine in payload["cosine_by_xi"].items()]
    shape = " x ".join(str(n) for n in payload["features_shape"])
    return (
        "VAT's probe step `xi * d` in float32: cosine between the float32 and the float64 "
        f"direction, for features of shape {shape} through {payload['head']}; a cosine near 1 "
        "means float32 finds the direction VAT means.\n\n" + _table(["xi", "cosine"], cells)
    )


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _generic(stem: str, payload: dict[str, Any]) -> str | None:
    results = payload.get("results")
    if isinstance(results, list) and results and all(isinstance(r, dict) for r in results):
        keys = [k for k in results[0] if all(_scalar(r.get(k)) for r in results)]
        if keys:
            cells = [[_cell(r.get(k)) for k in keys] for r in results]
            return _table([f"`{k}`" for k in keys], cells)
    if isinstance(results, dict):
        scalars = {k: v for k, v in results.items() if _scalar(v)}
        if scalars:
            return _table(["field", "value"], [[f"`{k}`", _cell(v)] for k, v in scalars.items()])
    return None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


RENDERERS: dict[str, tuple[str, Callable[[str, dict[str, Any]], str]]] = {
    "ssl_demo": ("Does DDFP help? The example loop on the demo data", _ssl_demo),
    "ssl_demo_tuning": (
        "Choosing the demo's settings: the same loop on held-out images",
        _ssl_demo,
    ),
    "train_step": ("Cost of one training iteration", _train_step),
    "perturbation_family": ("Cost of each feature perturbation", _perturbation_family),
    "perturbation": (
        "DDFP's perturbation step against the reference design",
        _perturbation_designs,
    ),
    "ddfp_direction_study": (
        "Which DDFP direction helps? The demo on its tuning split",
        _direction_study,
    ),
    "ddfp_gradient_probe": ("How local and how random is DDFP's direction?", _gradient_probe),
    "flow_coupling": ("The flow in other flow libraries", _flow_coupling),
    "vat_precision": ("VAT's probe length in float32", _vat_precision),
}


def _renderer(stem: str) -> tuple[str, Callable[[str, dict[str, Any]], str]] | None:
    matches = [key for key in RENDERERS if stem == key or stem.startswith(key + "_")]
    return RENDERERS[max(matches, key=len)] if matches else None


def _order(stem: str) -> tuple[int, str]:
    """Known benchmarks in the order of RENDERERS (accuracy first), then the rest by name."""
    keys = list(RENDERERS)
    matches = [key for key in keys if stem == key or stem.startswith(key + "_")]
    return (keys.index(max(matches, key=len)) if matches else len(keys), stem)


def _section(stem: str, payload: dict[str, Any]) -> str:
    found = _renderer(stem)
    title = found[0] if found else stem.replace("_", " ")
    body = None
    if found is not None:
        try:
            body = found[1](stem, payload)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError, StopIteration):
            body = None
    if body is None:
        body = _generic(stem, payload)
    if body is None:
        body = "This page has no table for this result file; read the JSON itself."
    return f"\n## {title} (`{stem}.json`)\n\n{body}\n\n{_provenance(payload)}\n"


def render_page(results: list[Result]) -> str:
    """The markdown of docs/benchmarks.md for these ``(stem, payload)`` results."""
    if not results:
        return HEADER + EMPTY
    ordered = sorted(results, key=lambda result: _order(result[0]))
    return HEADER + "".join(_section(stem, payload) for stem, payload in ordered)


def _plot_perturbation_family(payload: dict[str, Any], ax: Any) -> None:
    entries = sorted(payload["results"], key=lambda e: e["median_s"])
    names = [e["name"] for e in entries]
    medians = [1e3 * e["median_s"] for e in entries]
    colours = ["#7f7f7f" if "(" in n else ("#d62728" if n == "ddfp" else "#1f77b4") for n in names]
    ax.barh(names, medians, color=colours)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds per call (median, log scale)")


def _plot_train_step(payload: dict[str, Any], ax: Any) -> None:
    configs = payload["results"]["configs"]
    clock = "cpu" if "cpu" in _clocks(next(iter(configs.values()))) else "wall"
    source = _split_source(configs)
    steps = [entry[clock]["step"]["median"] for entry in configs.values()]
    splits = [entry.get(source, {}).get("split_share_of_step", {}) for entry in configs.values()]
    names = list(configs)
    parts: list[str] = []
    for split in splits:
        parts = parts or list(split)
    bottoms = [0.0] * len(names)
    for part in parts:
        heights = [split.get(part, 0.0) * step for split, step in zip(splits, steps)]
        ax.bar(names, heights, bottom=bottoms, label=part.replace("_", " "))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    rest = [step - b for step, b in zip(steps, bottoms)]
    ax.bar(names, rest, bottom=bottoms, color="#c7c7c7", label="rest of the iteration")
    ax.set_ylabel(f"{clock} seconds per iteration (median)")
    ax.set_xlabel("feature-perturbation streams (--fp)")
    ax.legend(fontsize=8)


def _plot_perturbation_designs(payload: dict[str, Any], ax: Any) -> None:
    points = payload["results"]["scaling"]["points"]
    designs = list(points[0]["designs"])
    for design in designs:
        done = [p for p in points if p["designs"][design].get("status", "ok") == "ok"]
        rows = [p["rows"] for p in done]
        ax.plot(rows, [p["designs"][design]["time"]["median"] for p in done], "o-", label=design)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows N")
    ax.set_ylabel("seconds per call (median)")
    ax.legend(fontsize=8)


PLOTTERS: dict[str, Callable[[dict[str, Any], Any], None]] = {
    "perturbation_family": _plot_perturbation_family,
    "train_step": _plot_train_step,
    "perturbation": _plot_perturbation_designs,
}


def write_plots(results: list[Result], assets_dir: Path = ASSETS_DIR) -> list[Path]:
    """Draw the plot of every result file whose section shows one; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stem, payload in results:
        if f"assets/{plot_path(stem).name}" not in _section(stem, payload):
            continue
        keys = [key for key in PLOTTERS if stem == key or stem.startswith(key + "_")]
        fig, ax = plt.subplots(figsize=(7.0, 3.6))
        PLOTTERS[max(keys, key=len)](payload, ax)
        ax.set_title(f"{stem}.json", fontsize=9)
        fig.tight_layout()
        assets_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot_path(stem, assets_dir), dpi=90, metadata={"Software": None})
        plt.close(fig)
        written.append(plot_path(stem, assets_dir))
    return written


README = ROOT / "README.md"
README_BEGIN = "<!-- demo results: written by docs/gen_benchmark_tables.py from ssl_demo.json -->"
README_END = "<!-- end of demo results -->"


def render_readme_results(payload: dict[str, Any]) -> str:
    """The README's results table: one row per method of the study at its labelled-set size."""
    results = payload["results"]
    setup = results["setup"]
    paired = {(row["method"], row["num_labeled"]): row for row in results["paired_vs_baseline"]}
    size = max(setup["num_labeled"])
    rows = []
    for row in results["table"]:
        if row["num_labeled"] != size:
            continue
        pair = paired.get((row["method"], size))
        difference = "baseline"
        if pair is not None:
            per_seed = ", ".join(f"{100 * d:+.2f}" for d in pair["difference"])
            difference = (
                f"{100 * pair['mean_difference']:+.2f} "
                f"({pair['wins']}/{len(pair['seeds'])} seeds above; per seed {per_seed})"
            )
        main = row["method"] == setup.get("main_job")
        rows.append(
            [
                f"**{row['label']}** (main job)" if main else row["label"],
                f"{100 * row['mean_miou']:.2f} ± {100 * row['std_miou']:.2f}",
                ", ".join(f"{100 * v:.2f}" for v in row["miou"]),
                difference,
            ]
        )
    header = ["method", "mIoU % (mean ± std)", "per seed", "minus supervised only"]
    missing = [r for r in results.get("not_run", []) if r["num_labeled"] == size]
    labels = setup.get("labels", {}) | {row["method"]: row["label"] for row in results["table"]}
    not_run = ""
    if missing:
        by_method: dict[str, list[str]] = {}
        for r in missing:
            by_method.setdefault(r["method"], []).append(str(r["seed"]))
        not_run = (
            "\n\nNot run yet: "
            + "; ".join(
                f"{labels.get(m, m.replace('_', ' '))} (seed {', '.join(seeds)})"
                for m, seeds in by_method.items()
            )
            + "."
        )
    return (
        f"{README_BEGIN}\n"
        f"Demo val split, {size} labelled images, seeds "
        f"{', '.join(str(s) for s in setup['seeds'])}, "
        f"{'/'.join(str(n) for n in setup['iterations'])} iterations each:\n\n"
        f"{_table(header, rows)}{not_run}\n{README_END}"
    )


STEP_BEGIN = (
    "<!-- perturbation step: written by docs/gen_benchmark_tables.py from perturbation.json -->"
)
STEP_END = "<!-- end of perturbation step -->"
#: The issue's targets for the step on the CPU: this much faster and leaner than the reference.
STEP_SPEED_TARGET, STEP_MEMORY_TARGET = 2.0, 5.0


def render_readme_perturbation(payload: dict[str, Any]) -> str:
    """The README's table of the perturbation step at the paper's crop, one row per mask density.

    Ratios are the reference design's median time and peak memory over the design's, measured
    side by side in one run; the head-alone column is the ceiling any implementation can reach
    (every design runs the fuse block forward and backward once).
    """
    results = payload["results"]
    by_key = {
        (row["design"], row["density"]): row
        for row in results.get("targets_b4_h129") or []
        if row["num_classes"] == 21
    }
    densities = sorted({density for _, density in by_key})
    rows = []
    for density in densities:
        auto = by_key.get(("ddfp_lib", density))
        if auto is None:
            continue
        dense = by_key.get(("ddfp_lib_dense", density))
        met = auto["speedup"] >= STEP_SPEED_TARGET and auto["memory_ratio"] >= STEP_MEMORY_TARGET
        rows.append(
            [
                f"{100 * density:.0f} %",
                f"{auto['speedup']:.2f}x / {auto['memory_ratio']:.1f}x",
                "-" if dense is None else f"{dense['speedup']:.2f}x / {dense['memory_ratio']:.1f}x",
                f"{auto['speedup_bound_head_only']:.2f}x / "
                f"{auto['memory_ratio_bound_head_only']:.1f}x",
                "yes" if met else "no",
            ]
        )
    header = [
        "confident pixels",
        'default call (`chunk_rows="auto"`): faster / leaner',
        "one dense call (`chunk_rows=None`)",
        "head alone (ceiling)",
        f"{STEP_SPEED_TARGET:g}x / {STEP_MEMORY_TARGET:g}x met",
    ]
    threads = results.get("shapes", [{}])[0].get("threads")
    return (
        f"{STEP_BEGIN}\n"
        "One DDFP step at the paper's crop (`v` of 4 x 304 x 129 x 129, fuse block in front, "
        "21 classes) against the public code's design (FrEIA flow, `(N, K, D)` mixture, flow on "
        "the confident rows only), time and peak memory ratios measured side by side in one run"
        f"{'' if threads is None else f' ({threads} CPU thread)'}:\n\n"
        f"{_table(header, rows)}\n{STEP_END}"
    )


STEP_COST_BEGIN = (
    "<!-- training-step cost: written by docs/gen_benchmark_tables.py from train_step_cpu.json -->"
)
STEP_COST_END = "<!-- end of training-step cost -->"


def render_readme_train_step(payload: dict[str, Any]) -> str:
    """The README's line on what the DDFP stream adds to an iteration of UniMatch's loop."""
    results = payload["results"]
    setup, overhead = results["setup"], results["overhead"]
    clock = "cpu" if "cpu" in overhead else "wall"
    found = overhead[clock]
    added = found["both_vs_dropout"]
    in_place = found.get("ddfp_vs_dropout")
    text = (
        f"{STEP_COST_BEGIN}\n"
        f"Adding the DDFP stream to UniMatch's dropout-FP loop (`--fp both` against `--fp dropout`) "
        f"adds {100 * added:.1f} % {clock.upper() if clock == 'cpu' else clock} time per iteration"
    )
    if in_place is not None:
        text += f"; DDFP in place of the dropout stream (`--fp ddfp`) {100 * in_place:+.1f} %"
    text += (
        f" ({setup['backbone']}, crop {setup['crop_size']}, batch "
        f"{setup['labeled_per_iteration']}+{setup['unlabeled_per_iteration']}, flow update "
        f"included, {setup['repeats']} interleaved rounds, {setup['torch_threads']} CPU thread)."
        f"\n{STEP_COST_END}"
    )
    return text


def update_readme_train_step(text: str, payload: dict[str, Any]) -> str:
    """``text`` with the training-step cost line replaced by the one rendered from ``payload``."""
    return _replace_block(text, STEP_COST_BEGIN, STEP_COST_END, render_readme_train_step(payload))


def _replace_block(text: str, begin_marker: str, end_marker: str, block: str) -> str:
    begin, end = text.find(begin_marker), text.find(end_marker)
    if begin < 0 or end < begin:
        raise ValueError(f"the README lacks the markers {begin_marker!r} ... {end_marker!r}")
    return text[:begin] + block + text[end + len(end_marker) :]


def update_readme(text: str, payload: dict[str, Any]) -> str:
    """``text`` with the block between the README markers replaced by the rendered table."""
    return _replace_block(text, README_BEGIN, README_END, render_readme_results(payload))


def update_readme_perturbation(text: str, payload: dict[str, Any]) -> str:
    """``text`` with the perturbation-step block replaced by the table rendered from ``payload``."""
    return _replace_block(text, STEP_BEGIN, STEP_END, render_readme_perturbation(payload))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--assets-dir", type=Path, default=ASSETS_DIR)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    results = load_results(args.results_dir)
    page = render_page(results)
    study = dict(results).get("ssl_demo")
    readme = args.readme.read_text()
    new_readme = readme if study is None else update_readme(readme, study)
    step = dict(results).get("perturbation")
    if step is not None:
        new_readme = update_readme_perturbation(new_readme, step)
    cost = dict(results).get("train_step_cpu")
    if cost is not None:
        new_readme = update_readme_train_step(new_readme, cost)
    if args.check:
        current = args.page.read_text() if args.page.is_file() else ""
        stale = [
            path
            for path, old, new in ((args.page, current, page), (args.readme, readme, new_readme))
            if old != new
        ]
        for path in stale:
            print(f"{path} is out of date: run python docs/gen_benchmark_tables.py")
        return 1 if stale else 0
    args.page.write_text(page)
    args.readme.write_text(new_readme)
    plots = write_plots(results, args.assets_dir)
    print(f"wrote {args.page} and {len(plots)} plots from {len(results)} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
