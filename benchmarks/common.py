"""Helpers shared by the benchmark scripts: timing, peak memory, machine facts, JSON results, workers.

Timing is ``torch.utils.benchmark``'s: :func:`make_timer` builds a ``Timer`` whose clock waits for
the device's queued work (CUDA, MPS), and :func:`interleaved` measures several of them in turns.

Peak memory on the CPU is the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set just before the call: it sees every allocation
torch makes, unlike ``tracemalloc``, which sees Python objects only.
Run it with :data:`EXACT_RSS_ENV` in the environment: glibc then returns every block above 64 KiB to
the system when it is freed, so the resident set follows the live tensors instead of glibc's cache.
On CUDA it is ``torch.cuda.max_memory_allocated`` over the allocation before the call.

Heavy configurations run in worker subprocesses (:func:`run_worker`), so that an out-of-memory failure
or a memory peak of one does not take the others with it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import timeit
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
# The example model's fuse block is DDFP's head in every benchmark.
from ddfp_examples.models import fuse_block  # noqa: E402

__all__ = [
    "EXACT_RSS_ENV",
    "REPO_ROOT",
    "command_line",
    "RESULTS_DIR",
    "WORKER_MARKER",
    "available_memory_bytes",
    "current_rss_bytes",
    "emit_worker_result",
    "fuse_block",
    "interleaved",
    "limit_address_space",
    "load_results",
    "machine_info",
    "make_timer",
    "matmul_throughput",
    "measure_peak_memory",
    "peak_rss_bytes",
    "require_device",
    "reset_peak_rss",
    "run_worker",
    "summary",
    "synchronize",
    "wall_clock",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Prefix of the one stdout line through which a worker subprocess hands back its result.
WORKER_MARKER = "BENCHMARK_RESULT "

#: Environment for processes that measure peak RSS: a fixed mmap threshold makes glibc unmap
#: freed blocks above 64 KiB at once (its default threshold grows up to 32 MiB, after which freed
#: tensors stay cached in the heap and RSS says more about glibc than about the code measured).
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

_MIB = 1024.0 * 1024.0


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device``: CUDA or MPS (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def require_device(name: str) -> torch.device:
    """``torch.device(name)`` for "cpu", "cuda" or "mps", or SystemExit when it is not there."""
    device = torch.device(name)
    mps = getattr(torch.backends, "mps", None)
    present = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": mps is not None and mps.is_available(),
    }
    if not present.get(device.type, False):
        raise SystemExit(f"--device {name} was asked for, but torch sees no such device")
    return device


def wall_clock(device: torch.device | str = "cpu") -> Callable[[], float]:
    """``timeit.default_timer`` read once ``device`` has done its queued work (CUDA, MPS)."""

    def clock() -> float:
        synchronize(device)
        return timeit.default_timer()

    return clock


def make_timer(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    clock: Callable[[], float] | None = None,
    **labels: str,
) -> benchmark.Timer:
    """A ``torch.utils.benchmark.Timer`` of ``fn()`` at this process's torch thread count.

    Args:
        fn: the work, taking no argument.
        device: where ``fn`` queues its work; the default clock waits for it.
        clock: the seconds counter to read instead of :func:`wall_clock` (``time.process_time``
            for this process's CPU time).
        labels: ``label``, ``sub_label`` and ``description``, the rows and columns of
            ``torch.utils.benchmark.Compare``.
    """
    return benchmark.Timer(
        stmt="fn()",
        globals={"fn": fn},
        timer=clock or wall_clock(device),
        num_threads=torch.get_num_threads(),
        **labels,
    )


def interleaved(
    timers: dict[str, benchmark.Timer], rounds: int
) -> dict[str, benchmark.Measurement]:
    """Measure every timer once a round, in an order that rotates by one each round.

    Taking turns gives every timer the same share of whatever else the machine is doing. Each turn
    is ``blocked_autorange(min_run_time=0)``: one untimed call, which sizes the block and brings
    back the caches that the other timers' calls displaced, then one timed call.

    Returns:
        Per timer, its rounds merged into one ``Measurement`` (``times`` holds one per round).
    """
    if rounds < 1 or not timers:
        raise ValueError(f"need rounds >= 1 and at least one timer, got {rounds} and {len(timers)}")
    names = list(timers)
    measured: dict[str, list[benchmark.Measurement]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            measured[name].append(timers[name].blocked_autorange(min_run_time=0))
    return {name: benchmark.Measurement.merge(runs)[0] for name, runs in measured.items()}


def summary(measurement: benchmark.Measurement) -> dict[str, Any]:
    """The JSON fields of a ``Measurement``: ``median``, ``iqr``, ``mean`` and ``times``, seconds."""
    return {
        "median": measurement.median,
        "iqr": measurement.iqr,
        "mean": measurement.mean,
        "times": list(measurement.times),
    }


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    kib = _status_kib("VmRSS")
    if kib is None:
        raise RuntimeError("/proc/self/status is not readable: RSS needs Linux")
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def available_memory_bytes() -> int:
    """``MemAvailable`` of the machine (what can still be allocated without swapping)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def limit_address_space(extra_bytes: int) -> None:
    """Cap this process's virtual memory at its current size plus ``extra_bytes``.

    An allocation beyond the cap then fails inside torch with a RuntimeError that the worker can
    report, instead of the kernel's OOM killer stopping a process of someone else on the machine.
    """
    size_kib = _status_kib("VmSize")
    if size_kib is None:
        return
    limit = size_kib * 1024 + int(extra_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def measure_peak_memory(
    fn: Callable[[], Any], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Run ``fn()`` once and report how far memory rose above where it was before the call.

    CPU: peak RSS growth (``VmHWM`` after a reset, minus RSS before); call this on the first call of
    a fresh process for a faithful number, since freed heap memory is reused without growing RSS.
    CUDA: ``max_memory_allocated`` growth over ``memory_allocated`` before the call.
    MPS, which keeps no peak: growth of the allocator's pool (``driver_allocated_memory``), emptied
    before the call; the pool keeps what the call's peak made it take.

    Returns:
        ``{"peak_mib", "baseline_mib", "method"}``; ``peak_mib`` is the growth.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = "torch.cuda.max_memory_allocated - memory_allocated before"
    elif device.type == "mps":
        synchronize(device)
        torch.mps.empty_cache()
        baseline = torch.mps.driver_allocated_memory()
        fn()
        synchronize(device)
        peak = torch.mps.driver_allocated_memory()
        method = "torch.mps.driver_allocated_memory after - before (pool emptied before)"
    else:
        exact = reset_peak_rss()
        baseline = current_rss_bytes()
        fn()
        peak = peak_rss_bytes()
        method = "VmHWM after clear_refs - VmRSS before" if exact else "ru_maxrss - VmRSS before"
    return {
        "peak_mib": max(peak - baseline, 0) / _MIB,
        "baseline_mib": baseline / _MIB,
        "method": method,
    }


def matmul_throughput(
    device: torch.device | str = "cpu", size: int = 2048, min_run_time: float = 1.0
) -> float:
    """Best measured float32 matmul throughput in FLOP/s, square products for ``min_run_time`` s.

    The fastest block of ``Timer.blocked_autorange`` is used: a floor estimate wants what the
    hardware can do, not what a busy machine happened to give.
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    measurement = make_timer(lambda: a @ b, device).blocked_autorange(min_run_time=min_run_time)
    return 2.0 * size**3 / min(measurement.times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Machine, library versions and load: what a reader needs to compare numbers across runs."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
        "torch": torch.__version__,
        "packages": {name: _package_version(name) for name in ("ddfp-lib", "nflows", "FrEIA")},
    }
    try:
        with open("/proc/meminfo") as meminfo:
            total = next(line for line in meminfo if line.startswith("MemTotal:"))
        info["memory_gib"] = round(int(total.split()[1]) / _MIB, 2)
    except (OSError, StopIteration):
        info["memory_gib"] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    if torch.device(device).type == "mps":
        info["mps_device"] = platform.machine()
    return info


def command_line() -> list[str]:
    """This process's command as typed from the repository root: ``python -m <module> ...`` for a
    module run, ``python <path relative to the repository> ...`` for a script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return ["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPO_ROOT):
        script = script.relative_to(REPO_ROOT)
    return ["python", str(script), *sys.argv[1:]]


def write_results(
    name: str,
    results: dict[str, Any],
    results_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    argv: list[str] | None = None,
) -> Path:
    """Write ``results`` to ``<results_dir>/<name>.json`` with machine, torch, command and date.

    Args:
        name: file stem, e.g. ``"perturbation"``.
        results: the benchmark's own JSON-ready numbers.
        results_dir: destination folder (created); defaults to ``benchmarks/results``.
        device: the device the numbers were measured on.
        argv: the command line to record; defaults to :func:`command_line`.

    Returns:
        The path written.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    command = argv if argv is not None else command_line()
    payload = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command),
        "torch": torch.__version__,
        "device": str(device),
        "machine": machine_info(device),
        "results": results,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file written by :func:`write_results`."""
    return json.loads(Path(path).read_text())


def emit_worker_result(result: dict[str, Any]) -> None:
    """Hand ``result`` back to the parent of a worker (one marked stdout line)."""
    print(WORKER_MARKER + json.dumps(result), flush=True)


def run_worker(
    module: str,
    config: dict[str, Any],
    timeout: float = 900.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m <module> --worker <config as JSON>`` from the repository root.

    Args:
        module: the benchmark module with a ``--worker`` entry point.
        config: what the worker measures, JSON-serialisable.
        timeout: seconds before the worker is killed.
        env: variables added to this process's environment for the worker.

    Returns:
        The worker's result, or ``{"status": "OOM/skipped" | "failed" | "timeout", ...}`` when it
        was killed, ran out of memory or raised.
    """
    command = [sys.executable, "-m", module, "--worker", json.dumps(config)]
    environment = {**os.environ, **(env or {})}
    try:
        done = subprocess.run(
            command,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=environment,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(WORKER_MARKER):
            return json.loads(line[len(WORKER_MARKER) :])
    tail = done.stderr.strip().splitlines()[-3:]
    out_of_memory = done.returncode == -9 or any(
        "memory" in line.lower() or "MemoryError" in line for line in tail
    )
    return {
        "status": "OOM/skipped" if out_of_memory else "failed",
        "returncode": done.returncode,
        "stderr_tail": tail,
    }
