"""The documentation: an example per public class, the pages' code, the benchmark page, the version.

The tools check the rest: ``python -m pytest`` runs the docstring examples of ``ddfp_lib`` as
doctests (``--doctest-modules`` in ``pyproject.toml``), and ``mkdocs build --strict`` fails on a
page missing from the navigation or a link, image or anchor that points nowhere (``validation:``
in ``mkdocs.yml``).
"""

from __future__ import annotations

import datetime
import doctest
import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ddfp_lib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def flat_text(path: Path) -> str:
    """The text of ``path`` with every run of whitespace, line breaks included, as one space."""
    return " ".join(path.read_text().split())


def public_classes() -> list[tuple[str, type]]:
    """Every class in the ``__all__`` of a public module of ``ddfp_lib``, once, with its path."""
    names = ["ddfp_lib"] + [
        info.name
        for info in pkgutil.walk_packages(ddfp_lib.__path__, "ddfp_lib.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    found: dict[type, str] = {}
    for name in names:
        module = importlib.import_module(name)
        for attribute in getattr(module, "__all__", []):
            value = getattr(module, attribute)
            if inspect.isclass(value) and value.__module__.startswith("ddfp_lib"):
                found.setdefault(value, f"{name}.{attribute}")
    return sorted(((path, cls) for cls, path in found.items()), key=lambda item: item[0])


def test_every_public_class_has_a_doctest_example():
    """docs/api.md promises a runnable example per class: the doctests run the examples there
    are, and nothing else notices a class that has none."""
    classes = public_classes()
    assert len(classes) >= 15, [path for path, _ in classes]
    without = []
    for path, cls in classes:
        tests = doctest.DocTestFinder(recurse=False).find(cls, path)
        if not tests or not tests[0].examples:
            without.append(path)
    assert not without, f"public classes without a runnable >>> example: {without}"


# ----------------------------------------------------------------------------------- the pages
def test_api_page_documents_every_name_of_the_public_api():
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)$", api, flags=re.M))
    short = {name.rsplit(".", 1)[-1] for name in documented}
    missing = [name for name in ddfp_lib.__all__ if name != "__version__" and name not in short]
    assert not missing, f"add to docs/api.md: {missing}"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_install_check_of_getting_started_prints_the_version_and_a_step_of_eps(capsys):
    (block,) = python_blocks("getting-started.md")
    exec(compile(block, "getting-started.md", "exec"), {})
    version, norm = capsys.readouterr().out.split()
    assert version == ddfp_lib.__version__ and float(norm) == pytest.approx(4.0, abs=1e-4)


def test_five_minute_code_moves_exactly_the_confident_pixels_and_steps_the_flow():
    (block,) = python_blocks("ddfp-in-5-minutes.md")
    namespace: dict[str, Any] = {}
    exec(compile(block, "ddfp-in-5-minutes.md", "exec"), namespace)
    v, v_ddfp, confident = namespace["v"], namespace["v_ddfp"], namespace["confident"]
    assert namespace["flow_trainer"].num_steps == 1 and v_ddfp.shape == v.shape
    # The snippet's head is a 1x1 convolution: only the confident pixels see a gradient.
    assert torch.equal((v_ddfp - v).norm(dim=1) > 0, confident)


def test_density_picture_exists_and_is_a_png():
    picture = DOCS / "assets" / "density_2d.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "assets/density_2d.png" in (DOCS / "index.md").read_text()


@pytest.mark.slow
def test_mkdocs_build_strict_passes(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).with_name("mkdocs"))
    if not Path(mkdocs).exists():
        pytest.skip("mkdocs is not installed (the [docs] extra)")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="ddfp_lib.FlowDensityEstimator"' in api
    assert "&gt;&gt;&gt; </span>" in api, "doctest examples must render as code"


# ------------------------------------------------------------------------------ the benchmarks
def load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_benchmark_tables", DOCS / "gen_benchmark_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_page_is_what_the_result_files_give():
    generator = load_generator()
    assert generator.main(["--check"]) == 0, "run: python docs/gen_benchmark_tables.py"


def test_benchmark_table_rows_carry_the_median_and_ratio_of_the_json(tmp_path):
    generator = load_generator()
    times = {"head forward (reference)": [0.2, 0.4, 0.3], "ddfp": [1.0, 1.5, 1.2]}
    payload = {
        "benchmark": "perturbation_family",
        "command": "python benchmarks/perturbation_family.py",
        "date": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_count": 2, "torch": "2.14.1", "device": "cpu"},
        "features_shape": [4, 304, 81, 81],
        "head": "fuse block",
        "repeats": 3,
        "results": [
            {
                "name": name,
                "times_s": t,
                "median_s": sorted(t)[1],
                "head_forwards": sorted(t)[1] / 0.3,
            }
            for name, t in times.items()
        ],
    }
    (tmp_path / "perturbation_family_cpu.json").write_text(json.dumps(payload))
    (tmp_path / "perturbation_family_quick.json").write_text(json.dumps(payload))
    results = generator.load_results(tmp_path)
    assert [stem for stem, _ in results] == ["perturbation_family_cpu"]
    page = generator.render_page(results)
    assert "| `ddfp` | 1200.0 | 1000.0 - 1500.0 | 4.00 |" in page
    assert "| head forward (reference) | 300.0 | 200.0 - 400.0 | 1.00 |" in page
    assert "assets/bench_perturbation_family_cpu.png" in page
    written = generator.write_plots(results, tmp_path / "assets")
    assert [p.name for p in written] == ["bench_perturbation_family_cpu.png"]


def train_step_page(tmp_path: Path, setup: dict[str, Any], configs: dict[str, Any],
                    overhead: dict[str, Any]) -> str:  # fmt: skip
    """The page of one train_step results file; its plot must be drawn too."""
    generator = load_generator()
    setup = {"backbone": "resnet50", "crop_size": 129, "labeled_per_iteration": 4,
             "unlabeled_per_iteration": 4, "repeats": 8, **setup}  # fmt: skip
    payload = {"results": {"setup": setup, "configs": configs, "overhead": overhead}}
    (tmp_path / "train_step_cpu.json").write_text(json.dumps(payload))
    results = generator.load_results(tmp_path)
    written = generator.write_plots(results, tmp_path / "assets")
    assert [p.name for p in written] == ["bench_train_step_cpu.png"]
    return generator.render_page(results)


def train_step_split(step: float, perturbation: float) -> dict[str, Any]:
    parts = {"perturbation": perturbation, "perturbed_branch": 0.5, "flow_update": 0.25}
    return {
        "step": {"median": step},
        "split": {part: {"median": v} for part, v in parts.items()},
        "split_share_of_step": {part: v / step for part, v in parts.items()},
    }


def test_train_step_table_of_a_file_with_both_clocks_shows_the_split_timed_on_the_cpu(tmp_path):
    def clock(step, perturbation=None):
        entry = train_step_split(step, perturbation) if perturbation is not None else {}
        return {**entry, "step": {"median": step, "iqr": 2.0}}

    configs = {
        "dropout": {"wall": clock(20.0), "cpu": clock(10.0)},
        "both": {"wall": clock(25.0, 2.0), "cpu": clock(12.5, 1.0)},
    }
    overhead = {"wall": {"both_vs_dropout": 0.25}, "cpu": {"both_vs_dropout": 0.25}}
    page = train_step_page(tmp_path, {}, configs, overhead)
    assert "| perturbation, cpu s (share) |" in page
    assert "| `both` | 25 (2) | 12.5 (2) | 1 (8.0 %) | 0.5 (4.0 %) | 0.25 (2.0 %) |" in page
    assert "| `dropout` | 20 (2) | 10 (2) |  |  |  |" in page
    assert "- cpu clock: both vs dropout +25.0 %" in page
    assert "is the steadier of the two on a shared machine" in page


def test_train_step_table_of_a_profiled_file_shows_its_clock_and_the_profiler_split(tmp_path):
    setup = {"clocks": {"cpu": "process time"}, "split": "From ranges."}
    configs = {
        "dropout": {"cpu": {"step": {"median": 10.0, "iqr": 0.5}}},
        "ddfp": {"cpu": {"step": {"median": 11.0, "iqr": 0.5}}, "profile": train_step_split(10, 1)},
    }
    overhead = {"cpu": {"ddfp_vs_dropout": 0.1}, "profile": {"split_ddfp": 0.2}}
    page = train_step_page(tmp_path, setup, configs, overhead)
    assert "Clock: process time. From ranges." in page
    assert "| cpu s per iteration, median (IQR) | perturbation, profiler s (share) |" in page
    assert "| `ddfp` | 11 (0.5) | 1 (10.0 %) | 0.5 (5.0 %) | 0.25 (2.5 %) |" in page
    assert "- cpu clock: ddfp vs dropout +10.0 %\n- profiler: split ddfp +20.0 %" in page


def test_benchmark_file_of_unknown_layout_gets_a_section_without_a_table(tmp_path):
    generator = load_generator()
    (tmp_path / "perturbation_family_cpu.json").write_text(json.dumps({"results": {"x": [1]}}))
    (tmp_path / "memory_sweep.json").write_text(json.dumps({"command": "python x.py"}))
    page = generator.render_page(generator.load_results(tmp_path))
    assert page.count("This page has no table for this result file") == 2
    assert "`python x.py`" in page and "| `ddfp` |" not in page


def test_benchmark_file_of_unknown_layout_with_flat_rows_gets_a_plain_table(tmp_path):
    generator = load_generator()
    rows = [{"rows": 1024, "seconds": 0.123456, "notes": [1]}, {"rows": 4096, "seconds": 2.5}]
    (tmp_path / "memory_sweep.json").write_text(json.dumps({"results": rows}))
    page = generator.render_page(generator.load_results(tmp_path))
    assert "| `rows` | `seconds` |\n|---|---|\n| 1024 | 0.1235 |\n| 4096 | 2.5 |" in page


def test_demo_accuracy_study_is_the_first_measured_section_with_paired_differences(tmp_path):
    generator = load_generator()
    table = [
        {"method": m, "label": label, "num_labeled": 30, "miou": v, "mean_miou": sum(v) / 2,
         "std_miou": 0.01}
        for m, label, v in (
            ("unimatch_dropout", "UniMatch (dropout FP)", [0.40, 0.44]),
            ("unimatch_ddfp", "UniMatch + DDFP", [0.43, 0.45]),
        )
    ]  # fmt: skip
    paired = [
        {"method": "unimatch_ddfp", "baseline": "unimatch_dropout", "num_labeled": 30,
         "seeds": [0, 1], "mean_difference": 0.02, "std_difference": 0.014, "wins": 2}
    ]  # fmt: skip
    setup = {"split": "reported", "epochs": 1, "iters_per_epoch": 40, "iterations": [40],
             "batch_size": 2, "eps": 4.0, "seeds": [0, 1], "score": "final-epoch mIoU"}  # fmt: skip
    study = {"results": {"setup": setup, "table": table, "paired_vs_baseline": paired}}
    (tmp_path / "ssl_demo.json").write_text(json.dumps(study))
    (tmp_path / "flow_coupling.json").write_text(json.dumps({"results": {"sizes": []}}))
    page = generator.render_page(generator.load_results(tmp_path))
    assert page.index("(`ssl_demo.json`)") < page.index("(`flow_coupling.json`)")
    assert (
        "| UniMatch + DDFP | 30 | 44.00 ± 1.00 | 43.0, 45.0 | +2.00 ± 1.40 (2/2 seeds better) |"
        in page
    )
    assert "| UniMatch (dropout FP) | 30 | 42.00 ± 1.00 | 40.0, 44.0 | baseline |" in page


def test_faq_reading_of_the_direction_study_and_probe_holds_in_their_json():
    """The FAQ's account of the direction study is what its JSON and the probe's say."""
    faq = flat_text(DOCS / "faq.md")
    assert "the direction without Dropout scores below the reference direction on every seed" in faq
    assert "at `r = 0.1` the rule holds no pixel still and the runs equal the default's" in faq
    results = ROOT / "benchmarks" / "results"
    study = json.loads((results / "ddfp_direction_study.json").read_text())["results"]
    assert study["decision"]["default"] == "ddfp_default"
    [deterministic] = [
        p for p in study["paired_vs_baseline"] if p["method"] == "ddfp_deterministic"
    ]
    assert deterministic["wins"] == 0 and len(deterministic["seeds"]) == 3
    score = {(r["method"], r["seed"]): r["final_miou"] for r in study["runs"]}
    local = [seed for method, seed in score if method == "ddfp_local"]
    assert local and all(score[("ddfp_local", s)] == score[("ddfp_default", s)] for s in local)
    probe = json.loads((results / "ddfp_gradient_probe.json").read_text())["results"]
    [row] = [r for r in probe["ratios"] if r["min_grad_ratio"] == 0.1]
    assert row["held_still"] == 0.0 and row["held_still_library"] == 0.0


def test_getting_started_reading_of_the_recipe_choices_holds_in_the_tuning_json():
    """The demo recipe's streams, labelled-set size and eps, as getting-started explains them, are
    what the tuning split's JSON files say (and the validation split is only quoted)."""
    text = flat_text(DOCS / "getting-started.md")
    results_dir = ROOT / "benchmarks" / "results"

    def scores(name: str) -> dict[tuple[str, int, int], float]:
        results = json.loads((results_dir / name).read_text())["results"]
        assert results["setup"]["split"] == "tuning"
        return {
            (r["method"], r["num_labeled"], r["seed"]): r["final_miou"] for r in results["runs"]
        }

    score = scores("ssl_demo_tuning.json")
    seeds = sorted(seed for method, size, seed in score if (method, size) == ("supervised", 120))
    assert seeds == [0, 1, 2]

    def at(method: str) -> list[float]:
        return [score[(method, 120, seed)] for seed in seeds]

    assert (
        "held-out images both streams scored higher than DDFP alone in the dropout stream's place "
        "on 2 of 3 seeds and higher on average, and DDFP alone fell below supervised only on 2 of 3 "
        "seeds"
    ) in text
    both, ddfp, supervised = at("unimatch_both"), at("unimatch_ddfp"), at("supervised")
    assert sum(b > d for b, d in zip(both, ddfp)) == 2 and sum(both) > sum(ddfp)
    assert sum(d < s for d, s in zip(ddfp, supervised)) == 2
    assert "with 120 it reaches about 49 % (three seeds) and the main job adds about 4" in text
    assert round(100 * statistics.mean(supervised)) == 49
    assert round(100 * (statistics.mean(both) - statistics.mean(supervised))) == 4
    assert "stays near 40 % mIoU on the held-out images (seed 0)" in text
    assert round(100 * score[("supervised", 60, 0)]) == 41
    assert "neither eps 2 nor eps 4 scored higher" in text
    for eps in ("2", "4"):
        other = scores(f"ssl_demo_tuning_eps{eps}.json")
        assert other[("unimatch_ddfp", 120, 0)] < score[("unimatch_ddfp", 120, 0)], eps
    recipes = importlib.import_module("ddfp_examples.recipes")
    assert recipes.RECIPES["demo"].fp == "both" and recipes.RECIPES["demo"].eps == 1.0


def test_direction_study_and_gradient_probe_sections_are_their_json(tmp_path):
    generator = load_generator()
    table = [
        {"method": m, "label": label, "num_labeled": 120, "miou": v, "mean_miou": sum(v) / 2,
         "std_miou": 0.02}
        for m, label, v in (
            ("ddfp_default", "DDFP (reference direction)", [0.50, 0.52]),
            ("ddfp_local", "DDFP, only pixels with a large gradient", [0.47, 0.49]),
        )
    ]  # fmt: skip
    paired = [
        {"method": "ddfp_local", "baseline": "ddfp_default", "num_labeled": 120, "seeds": [0, 1],
         "mean_difference": -0.03, "std_difference": 0.0, "wins": 0}
    ]  # fmt: skip
    setup = {"num_labeled": 120, "heldout": 300, "seeds": [0, 1],
             "methods": {"ddfp_default": ["--fp", "ddfp"],
                         "ddfp_local": ["--fp", "ddfp", "--ddfp-min-grad-ratio", "0.1"]}}  # fmt: skip
    decision = {"rule": "better on every seed", "default": "ddfp_default", "qualified": []}
    study = {"setup": setup, "table": table, "paired_vs_baseline": paired, "decision": decision}
    (tmp_path / "ddfp_direction_study.json").write_text(json.dumps({"results": study}))
    probe = {
        "setup": {"images": 16, "checkpoint": "run/latest.pt"},
        "feature_shape": [16, 144, 16, 16], "confident_fraction": 0.9,
        "unmasked_to_masked_median_norm": 0.25,
        "ratios": [{"min_grad_ratio": 0.5, "held_still": 0.026, "held_still_masked": 0.0285,
                    "held_still_unmasked": 0.0024, "held_still_library": 0.026}],
        "cosine": {"as_is_vs_as_is": {"median": 0.63, "min": 0.46},
                   "as_is_vs_no_dropout": {"median": 0.8, "min": 0.5}},
    }  # fmt: skip
    (tmp_path / "ddfp_gradient_probe.json").write_text(json.dumps({"results": probe}))
    page = generator.render_page(generator.load_results(tmp_path))
    assert (
        "| DDFP, only pixels with a large gradient | `--fp ddfp --ddfp-min-grad-ratio 0.1` "
        "| 48.00 ± 2.00 | 47.0, 49.0 | -3.00 ± 0.00 (0/2 seeds better) |" in page
    )
    assert "Decision rule: better on every seed. Default: DDFP (reference direction)." in page
    assert "| 0.5 | 2.60 | 2.85 | 0.24 | 2.60 |" in page
    assert "90.0 % of the pixels are confident" in page and "16x144x16x16" in page
    assert "median 0.630, minimum 0.460" in page


# ---------------------------------------------------------------------------- version, citation
def changelog_releases() -> list[tuple[str, str]]:
    text = (ROOT / "CHANGELOG.md").read_text()
    return re.findall(r"^## \[(\d+\.\d+\.\d+[^\]]*)\] - (\d{4}-\d{2}-\d{2})$", text, flags=re.M)


def citation_field(name: str) -> str:
    text = (ROOT / "CITATION.cff").read_text()
    match = re.search(rf"^{name}: \"?([^\"\n]+)\"?$", text, flags=re.M)
    assert match, f"CITATION.cff has no top-level {name}"
    return match.group(1)


def test_changelog_citation_and_package_agree_on_the_version_and_date():
    version, date = changelog_releases()[0]
    assert version == ddfp_lib.__version__
    assert citation_field("version") == ddfp_lib.__version__
    assert citation_field("date-released") == date
    datetime.date.fromisoformat(date)


def test_setup_cfg_reads_the_version_from_the_package():
    setup_cfg = (ROOT / "setup.cfg").read_text()
    assert re.search(r"^version = attr: ddfp_lib.__version__$", setup_cfg, flags=re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r"^version\s*=", pyproject, flags=re.M), (
        "one version: ddfp_lib.__version__"
    )


def test_citation_names_the_paper_and_its_authors():
    yaml = pytest.importorskip("yaml")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    paper = citation["preferred-citation"]
    assert paper["title"].startswith("Towards the Uncharted")
    assert [a["family-names"] for a in paper["authors"]] == ["Wang", "Bai", "Yu", "Zhao", "Xiao"]
    assert paper["year"] == 2024 and "2403.06462" in json.dumps(paper)


def _readme_block(readme: str, begin: str, end: str) -> str:
    return readme[readme.index(begin) : readme.index(end) + len(end)]


def test_readme_perturbation_table_is_perturbation_json_rendered() -> None:
    """The README's perturbation-step table is what the generator renders from perturbation.json."""
    generator = load_generator()
    payload = json.loads((ROOT / "benchmarks" / "results" / "perturbation.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = _readme_block(readme, generator.STEP_BEGIN, generator.STEP_END)
    assert block == generator.render_readme_perturbation(payload)


def _step_row(design: str, density: float, speedup: float, memory: float) -> dict[str, Any]:
    return {
        "design": design,
        "num_classes": 21,
        "density": density,
        "cosine": 1.0,
        "speedup": speedup,
        "memory_ratio": memory,
        "speedup_bound_head_only": 3.0,
        "memory_ratio_bound_head_only": 9.0,
    }


def test_perturbation_table_has_one_row_per_density_with_the_default_call_and_its_targets():
    generator = load_generator()
    rows = [
        _step_row("ddfp_lib", 0.3, 2.4, 4.0),
        _step_row("ddfp_lib_dense", 0.3, 0.9, 1.8),
        _step_row("ddfp_lib", 1.0, 2.0, 5.0),
        _step_row("ddfp_lib_chunked", 1.0, 2.2, 6.0),
        {**_step_row("ddfp_lib", 0.7, 9.0, 9.0), "num_classes": 19},
    ]
    payload = {"results": {"targets_b4_h129": rows, "shapes": [{"threads": 1}]}}
    block = generator.render_readme_perturbation(payload)
    lines = [line for line in block.splitlines() if line.startswith("| ")]
    assert len(lines) == 3  # header, 30 %, 100 % (the 19-class row is not the paper's VOC crop)
    assert lines[1] == "| 30 % | 2.40x / 4.0x | 0.90x / 1.8x | 3.00x / 9.0x | no |"
    assert lines[2] == "| 100 % | 2.00x / 5.0x | - | 3.00x / 9.0x | yes |"
    assert "(1 CPU thread)" in block
    readme = f"before\n{generator.STEP_BEGIN}\nold\n{generator.STEP_END}\nafter\n"
    assert generator.update_readme_perturbation(readme, payload) == f"before\n{block}\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        generator.update_readme_perturbation("no markers", payload)


def _readme_results_block(readme: str) -> str:
    generator = load_generator()
    begin, end = readme.index(generator.README_BEGIN), readme.index(generator.README_END)
    return readme[begin : end + len(generator.README_END)]


def test_readme_results_table_is_the_study_json_rendered():
    """The README's results block is exactly what the generator renders from ssl_demo.json."""
    generator = load_generator()
    payload = json.loads((ROOT / "benchmarks" / "results" / "ssl_demo.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert _readme_results_block(readme) == generator.render_readme_results(payload)


def test_readme_results_rows_are_the_mean_and_paired_difference_of_the_recorded_runs():
    """Recomputed from the raw runs of ssl_demo.json, independently of the study's aggregates."""
    payload = json.loads((ROOT / "benchmarks" / "results" / "ssl_demo.json").read_text())
    results = payload["results"]
    size = max(results["setup"]["num_labeled"])
    runs = [run for run in results["runs"] if run["num_labeled"] == size]
    block = _readme_results_block((ROOT / "README.md").read_text())
    base = {run["seed"]: run["final_miou"] for run in runs if run["method"] == "supervised"}
    for method in {run["method"] for run in runs}:
        mine = sorted((run["seed"], run["final_miou"]) for run in runs if run["method"] == method)
        values = [100 * v for _, v in mine]
        mean = sum(values) / len(values)
        label = next(row["label"] for row in results["table"] if row["method"] == method)
        if method == results["setup"]["main_job"]:
            label = f"**{label}** (main job)"
        line = next(line for line in block.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {mean:.2f} ± " in line, (method, line)
        assert ", ".join(f"{v:.2f}" for v in values) in line
        if method != "supervised":
            differences = [100 * (v - base[seed]) for seed, v in mine]
            wins = sum(d > 0 for d in differences)
            assert f"{sum(differences) / len(differences):+.2f} ({wins}/{len(mine)}" in line
            assert "per seed " + ", ".join(f"{d:+.2f}" for d in differences) in line
    assert sum("(main job)" in line for line in block.splitlines()) == 1
    labels = results["setup"].get("labels", {})
    for missing in results.get("not_run", []):
        named = labels.get(missing["method"], missing["method"].replace("_", " "))
        assert named in block.split("Not run yet:")[1], missing


def test_generator_check_fails_when_the_readme_table_is_stale(tmp_path):
    generator = load_generator()
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    page = tmp_path / "benchmarks.md"
    page.write_text((DOCS / "benchmarks.md").read_text())
    options = ["--check", "--readme", str(readme), "--page", str(page)]
    assert generator.main(options) == 0
    block = _readme_results_block(readme.read_text())
    first_row = next(line for line in block.splitlines() if line.startswith("| supervised only |"))
    stale = first_row.replace("|", "| 1", 2)
    readme.write_text(readme.read_text().replace(first_row, stale))
    assert generator.main(options) == 1


def test_readme_reading_of_the_demo_study_holds_seed_by_seed_in_its_runs():
    """The README's reading of the study (the main job against supervised only and its controls,
    DDFP alone against its own) is what ssl_demo.json's runs say at every seed: the sentences must
    change with them."""
    readme = flat_text(ROOT / "README.md")
    results = json.loads((ROOT / "benchmarks" / "results" / "ssl_demo.json").read_text())["results"]
    main = results["setup"]["main_job"]
    assert main == "unimatch_both"
    size = max(results["setup"]["num_labeled"])
    score = {
        (run["method"], run["seed"]): run["final_miou"]
        for run in results["runs"]
        if run["num_labeled"] == size
    }
    seeds = sorted({seed for _, seed in score})
    assert len(seeds) == 3

    def mean(method: str) -> float:
        return statistics.mean(score[(method, s)] for s in seeds)

    assert "The main job beats supervised only by more than 3 points on every seed" in readme
    for seed in seeds:
        assert score[(main, seed)] - score[("supervised", seed)] > 0.03, seed
    assert (
        "UniMatch's dropout FP alone and the random direction beside dropout FP each score above "
        "it on one of the three seeds and higher on average"
    ) in readme
    for control in ("unimatch_dropout", "unimatch_both_random_direction"):
        above = [score[(control, s)] > score[(main, s)] for s in seeds]
        assert sum(above) == 1, control
        assert mean(control) > mean(main), control
    assert (
        "DDFP beats supervised only and the random direction on every seed, but gains less than "
        "dropout FP on every seed"
    ) in readme
    for seed in seeds:
        ddfp = score[("unimatch_ddfp", seed)]
        assert ddfp > score[("supervised", seed)], seed
        assert ddfp > score[("unimatch_random_direction", seed)], seed
        assert score[("unimatch_dropout", seed)] > ddfp, seed


def test_readme_training_step_cost_is_train_step_json_rendered() -> None:
    generator = load_generator()
    payload = json.loads((ROOT / "benchmarks" / "results" / "train_step_cpu.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = _readme_block(readme, generator.STEP_COST_BEGIN, generator.STEP_COST_END)
    assert block == generator.render_readme_train_step(payload)


def test_training_step_cost_line_quotes_the_both_against_dropout_overhead_of_the_cpu_clock():
    generator = load_generator()
    setup = {
        "backbone": "resnet50",
        "crop_size": 129,
        "labeled_per_iteration": 4,
        "unlabeled_per_iteration": 4,
        "repeats": 8,
        "torch_threads": 1,
    }
    overhead = {
        "wall": {"both_vs_dropout": 0.5},
        "cpu": {"both_vs_dropout": 0.0812, "ddfp_vs_dropout": -0.02},
    }
    line = generator.render_readme_train_step({"results": {"setup": setup, "overhead": overhead}})
    assert "adds 8.1 % CPU time per iteration" in line
    assert "(`--fp ddfp`) -2.0 %" in line
    del overhead["cpu"]
    line = generator.render_readme_train_step({"results": {"setup": setup, "overhead": overhead}})
    assert "adds 50.0 % wall time per iteration" in line and "--fp ddfp" not in line
