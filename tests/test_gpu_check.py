"""benchmarks/gpu_check.sh, checked without a GPU: its arguments, its step list and its CPU rehearsal."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddfp_examples.runtime import DistributedContext

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["cuda_tests", "perturbation", "train_step", "shapes_data", "loop_bf16", "loop_torchrun"]


def run_script(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def listed_steps(**env: str) -> dict[str, list[str]]:
    result = run_script("--list", **env)
    assert result.returncode == 0, result.stderr
    steps = {}
    for line in result.stdout.splitlines()[1:]:
        name, limit, unit, *command = shlex.split(line)
        assert unit == "s" and int(limit) > 0
        steps[name] = command
    return steps


def option(command: list[str], flag: str, count: int = 1) -> list[str]:
    index = command.index(flag)
    return command[index + 1 : index + 1 + count]


def test_script_is_valid_bash_and_help_names_the_modes():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    result = run_script("--help")
    assert result.returncode == 0
    assert "GPU_CHECK_DEVICE=cpu" in result.stdout and "--list" in result.stdout


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--fast"], {}, "unknown argument '--fast'"),
        ([], {"GPU_CHECK_DEVICE": "tpu"}, "GPU_CHECK_DEVICE must be cuda or cpu, got 'tpu'"),
    ],
)
def test_bad_usage_exits_2_with_a_message(args, env, message):
    result = run_script(*args, **env)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_mode_without_cuda_exits_2_before_running_anything(tmp_path):
    result = run_script(GPU_CHECK_RESULTS=str(tmp_path))
    assert result.returncode == 2 and "no CUDA device here" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_gpu_steps_are_the_ones_asked_for_and_fit_in_eight_minutes():
    header, *lines = run_script("--list").stdout.splitlines()
    budget = int(header.split("budget ")[1].split()[0])
    assert sum(int(line.split()[1]) for line in lines) <= budget
    # Left of 8 minutes for the CUDA check, six step checks, a kill grace and the summary:
    assert budget + 60 <= 8 * 60
    steps = listed_steps()
    assert list(steps) == STEPS
    assert steps["cuda_tests"][-2:] == ["tests/test_cuda.py", "tests/test_ddfp.py"]
    assert option(steps["cuda_tests"][3:], "-m") == ["cuda"]  # after "python -m pytest"
    perturbation = steps["perturbation"]
    assert option(perturbation, "--device") == ["cuda"] and option(perturbation, "--sizes") == [
        "129"
    ]
    from benchmarks import perturbation as bench

    assert bench.BATCH == 4 and (129, 21, 0.7) in bench.FULL_SHAPES  # 4 x 129 x 129
    assert option(steps["train_step"], "--device") == ["cuda"]
    from benchmarks import train_step

    assert train_step.parse_args(["--device", "cuda"]).backbone == "resnet101"
    assert train_step.parse_args(["--device", "cuda"]).crop_size == 321
    assert steps["loop_torchrun"][:5] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
    ]
    for loop in ("loop_bf16", "loop_torchrun"):
        assert option(steps[loop], "--amp") == ["bf16"] and option(steps[loop], "--device") == [
            "cuda"
        ]


def test_gpu_loop_runs_take_exactly_fifty_iterations_on_the_generated_folder(tmp_path):
    """The GPU step's own folder and flags, read by the loop on the CPU: 5 epochs x 10 iterations."""
    import importlib.util

    steps = listed_steps()
    make = steps["shapes_data"]
    root = tmp_path / "shapes"
    spec = importlib.util.spec_from_file_location("make_shapes", REPO_ROOT / make[1])
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    shapes.main([str(root), *make[3:]])

    spec = importlib.util.spec_from_file_location(
        "loop", REPO_ROOT / "examples/voc_unimatch_plus_ddfp.py"
    )
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    argv = [str(root) if arg.endswith("/shapes") else arg for arg in steps["loop_bf16"][2:]]
    argv = [str(root / Path(a).name) if a.endswith(".txt") else a for a in argv]
    argv[argv.index("--device") + 1] = "cpu"
    args = loop.parse_args(argv)
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    loaders, _, sizes = loop.build_loaders(args, ctx)
    per_epoch = min(len(loaders["u"]), args.iters_per_epoch)
    assert per_epoch * args.epochs == 50 and args.eval_every == args.epochs
    assert sizes["val"] == 16 and sizes["labeled"] + sizes["unlabeled"] == 64


def test_cpu_rehearsal_lists_the_same_steps_tiny():
    steps = listed_steps(GPU_CHECK_DEVICE="cpu")
    assert list(steps) == STEPS
    assert "--quick" in steps["perturbation"] and "--quick" in steps["train_step"]
    assert option(steps["loop_bf16"], "--backbone") == ["mobilenet_v2"]


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_and_writes_a_passing_summary(tmp_path):
    result = run_script(timeout=240, GPU_CHECK_DEVICE="cpu", GPU_CHECK_RESULTS=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for step in STEPS:
        assert f"[gpu_check] PASS    {step}" in result.stdout
    written = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    found = written["results"]
    assert [s["step"] for s in found["steps"]] == STEPS and found["passed"] == len(STEPS)
    assert all(s["status"] == "pass" and s["checked"] for s in found["steps"])
    assert (tmp_path / "perturbation_quick.json").is_file()
    assert (tmp_path / "train_step_cpu_quick.json").is_file()
    assert "summary on cpu: 6 of 6 steps passed" in result.stdout


@pytest.mark.slow
def test_spent_budget_leaves_later_steps_not_run_and_the_check_fails(tmp_path):
    result = run_script(
        timeout=120,
        GPU_CHECK_DEVICE="cpu",
        GPU_CHECK_RESULTS=str(tmp_path),
        GPU_CHECK_BUDGET_S="12",
    )
    assert result.returncode == 1
    found = json.loads((tmp_path / "gpu_check_cpu.json").read_text())["results"]
    statuses = {s["step"]: s["status"] for s in found["steps"]}
    assert list(statuses) == STEPS
    assert statuses["loop_torchrun"] == "not_run" and found["passed"] < len(STEPS)
