"""Benchmark of DDFP's perturbation step: ddfp_lib against the public code's design.

Four designs compute ``delta = eps * g / ||g||`` for the same decoder input ``v``, fuse block, flow
weights, mixture means and confident-pixel mask:

- ``reference``: :mod:`benchmarks.reference_design` (FrEIA flow, ``(N, K, D)`` mixture, boolean
  gather of the valid rows before the flow);
- ``ddfp_lib``: the default call, ``DensityDescendingPerturbation(estimator, eps)(v,
  head=fuse_block, mask=mask)`` (``chunk_rows="auto"``: 16,384 rows per flow evaluation, the
  masked rows only on the CPU, every row and no host-device synchronisation on CUDA);
- ``ddfp_lib_dense``: ``chunk_rows=None``, every row in one flow evaluation (the default before
  ``"auto"``);
- ``ddfp_lib_chunked``: ``chunk_rows=n``: only the masked rows go through flow + prior, ``n`` rows
  at a time on every device (one synchronisation on CUDA). In all of them the head runs once, each
  chunk is differentiated on its own, and one backward pass goes through the head.

The shapes section also times ``head_only``, the fuse block's forward and input gradient without any
density: every design pays it, so ``reference / head_only`` bounds the speed-up (and memory ratio)
any implementation of the step can reach.

Per configuration, every design first runs in a fresh subprocess of its own: its first call gives
the peak memory (growth of peak RSS with glibc's mmap threshold fixed, see ``benchmarks.common``;
``max_memory_allocated`` on CUDA) and the delta; the deltas (same dropout masks) are compared by
cosine. Then one subprocess times all designs in turns, ``repeats`` rounds after a warm-up call of
each (``torch.utils.benchmark``, see :func:`benchmarks.common.interleaved`), so that they share the
machine's load alike.

Sections: ``shapes`` (decoder-sized inputs), ``scaling`` (rows only, time and memory against N with
fitted log-log exponents) and ``profile`` (torch.profiler table of ddfp_lib's step and an
optimisation pass: channels-last head, torch.compile of the density, bf16 autocast of the head,
row chunks).

Usage::

    python -m benchmarks.perturbation                 # shapes + scaling on the CPU
    python -m benchmarks.perturbation --profile       # and the profile section
    python -m benchmarks.perturbation --quick         # tiny shapes, 2 repeats
    python -m benchmarks.perturbation --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from benchmarks.common import (
    EXACT_RSS_ENV,
    available_memory_bytes,
    emit_worker_result,
    interleaved,
    limit_address_space,
    make_timer,
    matmul_throughput,
    measure_peak_memory,
    run_worker,
    summary,
    write_results,
)

__all__ = [
    "DESIGNS",
    "HEAD_ONLY",
    "VARIANTS",
    "build_setup",
    "fit_exponent",
    "main",
    "perturbation_flops",
]

DESIGNS = ("reference", "ddfp_lib", "ddfp_lib_dense", "ddfp_lib_chunked")
#: Not a design: the fuse block's forward and input gradient alone, the floor every design pays.
HEAD_ONLY = "head_only"
VARIANTS = (
    "baseline",
    "channels_last",
    "compile_density",
    "bf16_head",
    "chunked",
    "chunked_4096",
    "chunked_4096_channels_last",
)

IN_CHANNELS = 304
DIM = 256
HIDDEN = 256
NUM_BLOCKS = 2
EPS = 4.0
BATCH = 4
CHUNK_ROWS = 16384
#: a variant slower than this for its first two calls is reported as such, not waited for.
VARIANT_TIMEOUT_S = 300.0
#: memory left to the rest of the machine when a worker caps its address space.
MEMORY_MARGIN_BYTES = 2 * 1024**3

FULL_SHAPES = [(size, 21, density) for size in (33, 81, 129) for density in (0.3, 0.7, 1.0)] + [
    (size, 19, 0.7) for size in (33, 81)
]
FULL_ROWS = [1024, 4096, 16384, 65536, 262144]
QUICK_SHAPES = [(9, 21, 0.7)]
QUICK_ROWS = [512, 2048]
PROFILE_SHAPE = (BATCH, 129, 21, 0.7)
QUICK_PROFILE_SHAPE = (2, 17, 21, 0.7)
MODULE = "benchmarks.perturbation"


def perturbation_flops(
    rows: int,
    flow_rows: int,
    num_classes: int,
    with_head: bool,
    in_channels: int = IN_CHANNELS,
    dim: int = DIM,
    hidden: int = HIDDEN,
    num_blocks: int = NUM_BLOCKS,
) -> float:
    """Floating-point operations a perturbation step cannot avoid.

    Head forward + input-gradient backward (two 3x3 convolutions, each backward costs its
    forward), flow forward + input-gradient backward on ``flow_rows`` rows (four subnets of three
    Linear layers per block pair), and the mixture as one ``(N, D) x (D, K)`` product each way.
    Elementwise work (BatchNorm, ReLU, exp, the reference's ``(N, K, D)`` tensor) is not counted.
    """
    head = 0.0
    if with_head:
        head = 2.0 * rows * 9 * (in_channels * dim + dim * dim) * 2
    half = dim // 2
    subnet = 2.0 * (half * hidden + hidden * hidden + hidden * 2 * half)
    flow = 2 * num_blocks * subnet * flow_rows * 2
    prior = 2.0 * flow_rows * num_classes * dim * 2
    return head + flow + prior


def fit_exponent(sizes: list[float], values: list[float]) -> float | None:
    """Least-squares slope of ``log(values)`` against ``log(sizes)`` (None for fewer than 2 points)."""
    points = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if s > 0 and v > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in points)
    denominator = sum((x - mean_x) ** 2 for x, _ in points)
    return numerator / denominator if denominator > 0 else None


def build_setup(
    num_classes: int,
    device: str,
    batch: int | None = None,
    size: int | None = None,
    rows: int | None = None,
    density: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Models and inputs shared by every design: identical weights, features and mask.

    Either ``batch`` and ``size`` (decoder-input maps through the fuse block) or ``rows`` (feature
    rows in the density space, no head).

    Returns:
        ``{"reference", "estimator", "head", "features", "mask"}``; ``head`` is None for rows.
    """
    from benchmarks.reference_design import ReferenceDensity, copy_reference_flow, fuse_block
    from ddfp_lib import FlowDensityEstimator

    reference = ReferenceDensity(DIM, num_classes, NUM_BLOCKS, HIDDEN, seed=seed + 1)
    estimator = FlowDensityEstimator(DIM, num_classes, NUM_BLOCKS, HIDDEN, seed=seed + 2)
    copy_reference_flow(reference, estimator)
    generator = torch.Generator().manual_seed(seed + 3)
    if rows is None:
        if batch is None or size is None:
            raise ValueError("give batch and size, or rows")
        torch.manual_seed(seed + 4)
        head = fuse_block(IN_CHANNELS, DIM).train().to(device)
        features = torch.randn(batch, IN_CHANNELS, size, size, generator=generator)
        mask = torch.rand(batch, size, size, generator=generator) < density
    else:
        head = None
        features = torch.randn(rows, DIM, generator=generator)
        mask = torch.rand(rows, generator=generator) < density
    return {
        "reference": reference.to(device),
        "estimator": estimator.to(device),
        "head": head,
        "features": features.to(device),
        "mask": mask.to(device),
    }


def _step(design: str, setup: dict[str, Any], chunk_rows: int) -> Callable[[], torch.Tensor]:
    from benchmarks.reference_design import reference_perturbation
    from ddfp_lib import DensityDescendingPerturbation

    features, head, mask = setup["features"], setup["head"], setup["mask"]
    if design == "reference":
        reference = setup["reference"]
        return lambda: reference_perturbation(reference, head, features, mask, EPS)
    estimator = setup["estimator"]
    if design == "ddfp_lib":
        ddfp = DensityDescendingPerturbation(estimator, eps=EPS)
        return lambda: ddfp(features, head=head, mask=mask)
    if design == "ddfp_lib_dense":
        dense = DensityDescendingPerturbation(estimator, eps=EPS, chunk_rows=None)
        return lambda: dense(features, head=head, mask=mask)
    if design == "ddfp_lib_chunked":
        chunked = DensityDescendingPerturbation(estimator, eps=EPS, chunk_rows=chunk_rows)
        return lambda: chunked(features, head=head, mask=mask)
    if design == HEAD_ONLY:
        return lambda: _head_input_gradient(head, features)
    raise ValueError(f"unknown design {design!r}; expected one of {DESIGNS} or {HEAD_ONLY!r}")


def _head_input_gradient(head: Callable, features: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = features.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(head(leaf).sum(), leaf)
    return gradient


def _delta(design: str, output: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return output if design in ("reference", HEAD_ONLY) else output - features


def _cap_memory(device: str) -> None:
    if device == "cpu":
        limit_address_space(max(available_memory_bytes() - MEMORY_MARGIN_BYTES, 0))


def _setup_from(config: dict[str, Any]) -> dict[str, Any]:
    if "shape" in config:
        batch, size, num_classes, density = config["shape"]
        return build_setup(num_classes, config["device"], batch=batch, size=size, density=density)
    return build_setup(
        config["num_classes"],
        config["device"],
        batch=config.get("batch"),
        size=config.get("size"),
        rows=config.get("rows"),
        density=config["density"],
    )


def _build_step(config: dict[str, Any], name: str, setup: dict[str, Any]) -> Callable:
    if config["kind"].startswith("variant"):
        return _variant_step(name, setup, config["device"])
    return _step(name, setup, config.get("chunk_rows", CHUNK_ROWS))


def _reference_does_not_fit(config: dict[str, Any]) -> str | None:
    """Why the reference's ``(N, K, D)`` tensors cannot fit in free memory (None if they may).

    A lower bound: three of them are alive at once in forward (repeat, difference, square).
    """
    if config["device"] != "cpu":
        return None
    rows = config.get("rows") or config["batch"] * config["size"] ** 2
    needed = 3 * round(rows * config["density"]) * config["num_classes"] * DIM * 4
    free = available_memory_bytes() - MEMORY_MARGIN_BYTES
    if needed <= free:
        return None
    return f"predicted {needed / 2**30:.1f} GiB for (N, K, D) tensors, {free / 2**30:.1f} GiB free"


def _worker_memory(config: dict[str, Any]) -> dict[str, Any]:
    """One design or variant in a fresh process: peak memory and time of its first two calls."""
    device, name = config["device"], config["name"]
    if name == "reference":
        reason = _reference_does_not_fit(config)
        if reason is not None:
            return {"status": "OOM/skipped", "error": reason}
    setup = _setup_from(config)
    step = _build_step(config, name, setup)
    _cap_memory(device)
    outputs: list[torch.Tensor] = []
    torch.manual_seed(11)
    start = time.perf_counter()
    first = measure_peak_memory(lambda: outputs.append(step()), device)
    first_call = time.perf_counter() - start
    delta = _delta(name, outputs.pop(), setup["features"]).detach().float().cpu()
    torch.save(delta, config["delta_path"])
    del delta
    start = time.perf_counter()
    second = measure_peak_memory(step, device)
    return {
        "status": "ok",
        "memory": first,
        "memory_second_call": second,
        "first_call_s": first_call,
        "second_call_s": time.perf_counter() - start,
    }


#: The per-call fields of a timing worker's result, and the ``getrusage`` field behind each.
_USAGE = {
    "per_call_user_s": "ru_utime",
    "per_call_sys_s": "ru_stime",
    "per_call_minor_page_faults": "ru_minflt",
}


class _UsageCounter:
    """``fn``, adding up this process's CPU seconds and minor page faults over its calls."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.calls = 0
        self.totals = dict.fromkeys(_USAGE, 0.0)

    def __call__(self) -> Any:
        before = resource.getrusage(resource.RUSAGE_SELF)
        result = self.fn()
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.calls += 1
        for name, field in _USAGE.items():
            self.totals[name] += getattr(after, field) - getattr(before, field)
        return result

    def per_call(self) -> dict[str, float]:
        return {name: total / max(self.calls, 1) for name, total in self.totals.items()}


def _worker_timing(config: dict[str, Any]) -> dict[str, Any]:
    """All designs (or variants) of one configuration in one process, timed in turns.

    Taking turns gives every design the same share of whatever else runs on the machine. The
    process's user and system CPU seconds and minor page faults are recorded per call of the rounds
    too: on a VM whose host backs guest memory lazily, page faults of fresh allocations can dominate.
    """
    device, names = config["device"], config["names"]
    shared = None if config["kind"].startswith("variant") else _setup_from(config)
    steps = {}
    for name in names:
        setup = shared if shared is not None else _setup_from(config)
        steps[name] = _build_step(config, name, setup)
    _cap_memory(device)
    timers, usage, errors = {}, {}, {}
    for name in names:
        try:
            for _ in range(config.get("warmup", 1)):
                steps[name]()
        except (MemoryError, RuntimeError) as error:
            errors[name] = str(error)[:400]
            continue
        usage[name] = _UsageCounter(steps[name])
        timers[name] = make_timer(usage[name], device)
    measured = interleaved(timers, config["repeats"]) if timers else {}
    result: dict[str, Any] = {"status": "ok", "time": {}}
    for name in names:
        if name in errors:
            result["time"][name] = {"status": "OOM/skipped", "error": errors[name]}
        else:
            result["time"][name] = {**summary(measured[name]), **usage[name].per_call()}
    return result


def _profile_rows(profiler: Any, device: str, limit: int) -> list[dict[str, Any]]:
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    return [
        {
            "op": event.key,
            "self_ms": getattr(event, key, 0.0) / 1000.0,
            "total_cpu_ms": event.cpu_time_total / 1000.0,
            "calls": event.count,
        }
        for event in events[:limit]
    ]


def _worker_profile(config: dict[str, Any]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    device = config["device"]
    batch, size, num_classes, density = config["shape"]
    setup = build_setup(num_classes, device, batch=batch, size=size, density=density)
    step = _step("ddfp_lib", setup, CHUNK_ROWS)
    step()
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=20)
    return {"status": "ok", "top_ops": _profile_rows(profiler, device, 20), "table": table}


def _variant_step(name: str, setup: dict[str, Any], device: str) -> Callable[[], torch.Tensor]:
    from ddfp_lib import DensityDescendingPerturbation

    estimator, head, mask = setup["estimator"], setup["head"], setup["mask"]
    features = setup["features"]
    if "channels_last" in name:
        head.to(memory_format=torch.channels_last)
        features = features.contiguous(memory_format=torch.channels_last)
        setup["features"] = features
    if name == "compile_density":
        estimator.log_prob_rows = torch.compile(estimator.log_prob_rows)
    chunk_rows: int | Literal["auto"] = CHUNK_ROWS if name.startswith("chunked") else "auto"
    if name.startswith("chunked_4096"):
        chunk_rows = 4096
    ddfp = DensityDescendingPerturbation(estimator, eps=EPS, chunk_rows=chunk_rows)
    if name.startswith("chunked"):
        return lambda: ddfp(features, head=head, mask=mask)
    if name == "bf16_head":

        def autocast_step() -> torch.Tensor:
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                return ddfp(features, head=head, mask=mask)

        return autocast_step
    if name in ("baseline", "channels_last", "compile_density"):
        return lambda: ddfp(features, head=head, mask=mask)
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")


def worker(config: dict[str, Any]) -> None:
    """Entry point of a worker subprocess: run one configuration, print its result."""
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    # autograd.grad with grad_outputs imports this (and sympy) on first use: ~1 s and ~50 MiB that
    # would otherwise be charged to the first measured call of the chunked design.
    importlib.import_module("torch.fx.experimental.symbolic_shapes")
    kind = config["kind"]
    runners = {
        "memory": _worker_memory,
        "timing": _worker_timing,
        "variant_memory": _worker_memory,
        "variant_timing": _worker_timing,
        "profile": _worker_profile,
    }
    try:
        result = runners[kind](config)
    except (MemoryError, RuntimeError) as error:
        message = str(error)
        out_of_memory = isinstance(error, MemoryError) or "memory" in message.lower()
        result = {"status": "OOM/skipped" if out_of_memory else "failed", "error": message[:400]}
    emit_worker_result(result)


def _cosine(a_path: Path, b_path: Path) -> dict[str, float]:
    a = torch.load(a_path).double()
    b = torch.load(b_path).double()
    overall = float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))
    per_pixel = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-300).reshape(-1)
    both = (a.norm(dim=1) > 0).reshape(-1) & (b.norm(dim=1) > 0).reshape(-1)
    per_pixel = per_pixel[both]
    if per_pixel.numel() == 0:
        return {"overall": overall}
    return {
        "overall": overall,
        "per_pixel_min": float(per_pixel.min()),
        "per_pixel_p001": float(torch.quantile(per_pixel, 0.001))
        if per_pixel.numel() < 2**24
        else float(per_pixel.min()),
    }


def _compare(results: dict[str, Any], paths: dict[str, Path], baseline: str) -> None:
    """Add speed-up, memory ratio and delta cosine against ``baseline`` to every other result."""
    base = results.get(baseline, {})
    if base.get("status") != "ok":
        return
    for name, result in results.items():
        if name == baseline or result.get("status") != "ok":
            continue
        if name != HEAD_ONLY:
            result[f"cosine_vs_{baseline}"] = _cosine(paths[baseline], paths[name])
        if "median" in result.get("time", {}):
            result[f"speedup_vs_{baseline}"] = base["time"]["median"] / result["time"]["median"]
        result[f"memory_ratio_vs_{baseline}"] = base["memory"]["peak_mib"] / max(
            result["memory"]["peak_mib"], 1e-9
        )


def _run_configuration(
    base: dict[str, Any],
    names: tuple[str, ...],
    scratch: Path,
    tag: str,
    log: Callable[[str], None],
    variants: bool = False,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Memory workers (one fresh process per design), then one round-robin timing worker.

    A design whose memory worker fails or takes longer than ``timeout`` is not timed.
    """
    prefix = "variant_" if variants else ""
    results: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    for name in names:
        paths[name] = scratch / f"{tag}_{name}.pt"
        config = {**base, "kind": prefix + "memory", "name": name, "delta_path": str(paths[name])}
        results[name] = run_worker(MODULE, config, timeout=timeout, env=EXACT_RSS_ENV)
    fitted = tuple(name for name in names if results[name].get("status") == "ok")
    if fitted:
        config = {**base, "kind": prefix + "timing", "names": list(fitted)}
        timing = run_worker(MODULE, config, timeout=4 * timeout)
        for name in fitted:
            measured = timing.get("time", {}).get(name)
            if measured is None:
                results[name] = {**results[name], "status": timing.get("status", "failed")}
                results[name]["error"] = timing.get("error", timing.get("stderr_tail"))
            elif "median" not in measured:
                results[name] = {**results[name], **measured}
            else:
                results[name]["time"] = measured
    for name in names:
        result = results[name]
        if result.get("status") == "ok":
            seconds = result["time"]
            log(
                f"  {tag} {name:26s} median {seconds['median']:.3f} s "
                f"(IQR {seconds['iqr']:.3f}, sys {seconds.get('per_call_sys_s', 0.0):.2f} s, "
                f"first call {result['first_call_s']:.2f} s), "
                f"peak +{result['memory']['peak_mib']:.0f} MiB"
            )
        else:
            detail = result.get("error") or result.get("stderr_tail") or ""
            log(f"  {tag} {name:26s} {result.get('status')}: {str(detail)[:160]}")
    _compare(results, paths, "reference" if not variants else "baseline")
    return results


def run_shapes(
    args: argparse.Namespace, scratch: Path, flops_per_s: float, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The decoder-shaped configurations: B x H x W pixels through the fuse block."""
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.sizes:
        shapes = [shape for shape in shapes if shape[0] in args.sizes]
    batch = 2 if args.quick else BATCH
    entries = []
    for size, num_classes, density in shapes:
        repeats = args.repeats or (2 if args.quick else 3)
        base = {
            "device": args.device,
            "threads": args.threads,
            "batch": batch,
            "size": size,
            "num_classes": num_classes,
            "density": density,
            "repeats": repeats,
            "chunk_rows": args.chunk_rows,
        }
        tag = f"B{batch}_H{size}_K{num_classes}_d{density}"
        log(f"shape {tag}")
        designs = _run_configuration(base, (*DESIGNS, HEAD_ONLY), scratch, tag, log)
        rows = batch * size * size
        flops = perturbation_flops(rows, round(rows * density), num_classes, with_head=True)
        entries.append(
            {**base, "rows": rows, "flop_floor_s": flops / flops_per_s, "designs": designs}
        )
    return entries


def run_scaling(
    args: argparse.Namespace, scratch: Path, flops_per_s: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Rows only (no head): time and memory against N, with fitted log-log exponents."""
    sizes = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    points = []
    for rows in sizes:
        repeats = args.repeats or (2 if args.quick else 3)
        base = {
            "device": args.device,
            "threads": args.threads,
            "rows": rows,
            "num_classes": 21,
            "density": 1.0,
            "repeats": repeats,
            "chunk_rows": args.chunk_rows,
        }
        log(f"rows N={rows}")
        designs = _run_configuration(base, DESIGNS, scratch, f"N{rows}", log)
        flops = perturbation_flops(rows, rows, 21, with_head=False)
        points.append({**base, "flop_floor_s": flops / flops_per_s, "designs": designs})
    exponents: dict[str, Any] = {}
    for design in DESIGNS:
        done = [p for p in points if p["designs"][design].get("status") == "ok"]
        sizes_ok = [p["rows"] for p in done]
        times = [p["designs"][design]["time"]["median"] for p in done]
        memory = [p["designs"][design]["memory"]["peak_mib"] for p in done]
        large = [i for i, n in enumerate(sizes_ok) if n >= 16384]
        exponents[design] = {
            "rows": sizes_ok,
            "time_all": fit_exponent(sizes_ok, times),
            "memory_all": fit_exponent(sizes_ok, memory),
            "time_n_ge_16384": fit_exponent(
                [sizes_ok[i] for i in large], [times[i] for i in large]
            ),
            "memory_n_ge_16384": fit_exponent(
                [sizes_ok[i] for i in large], [memory[i] for i in large]
            ),
        }
    return {"points": points, "exponents": exponents}


def run_profile(args: argparse.Namespace, scratch: Path, log: Callable[[str], None]):
    """torch.profiler table of ddfp_lib's step, then the optimisation variants side by side."""
    shape = QUICK_PROFILE_SHAPE if args.quick else PROFILE_SHAPE
    log(f"profile of ddfp_lib at (B, H, K, density) = {shape}")
    base = {"device": args.device, "threads": args.threads, "shape": list(shape)}
    table = run_worker(MODULE, {**base, "kind": "profile"})
    variants = tuple(v for v in VARIANTS if not (args.quick and v == "compile_density"))
    base["repeats"] = args.repeats or (2 if args.quick else 3)
    results = _run_configuration(
        base, variants, scratch, "variant", log, variants=True, timeout=VARIANT_TIMEOUT_S
    )
    return {"shape_b_h_k_density": list(shape), "profiler": table, "variants": results}


def _targets(shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper-crop targets: >= 2x faster and >= 5x lower peak memory than the reference.

    Each row also carries the bounds set by the head alone (``reference / head_only``).
    """
    rows = []
    for entry in shapes:
        if entry["size"] != 129 or entry["batch"] != BATCH:
            continue
        head = entry["designs"].get(HEAD_ONLY, {})
        for design, result in entry["designs"].items():
            if design == HEAD_ONLY or "speedup_vs_reference" not in result:
                continue
            rows.append(
                {
                    "design": design,
                    "num_classes": entry["num_classes"],
                    "density": entry["density"],
                    "cosine": result["cosine_vs_reference"]["overall"],
                    "speedup": result["speedup_vs_reference"],
                    "memory_ratio": result["memory_ratio_vs_reference"],
                    "speedup_bound_head_only": head.get("speedup_vs_reference"),
                    "memory_ratio_bound_head_only": head.get("memory_ratio_vs_reference"),
                    "meets_speed_target": result["speedup_vs_reference"] >= 2.0,
                    "meets_memory_target": result["memory_ratio_vs_reference"] >= 5.0,
                }
            )
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 2 repeats")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["shapes", "scaling"],
        choices=("shapes", "scaling", "profile"),
    )
    parser.add_argument("--profile", action="store_true", help="add the profile section")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per configuration")
    parser.add_argument("--sizes", type=int, nargs="+", help="only these H=W in the shapes section")
    parser.add_argument("--rows", type=int, nargs="+", help="the N of the scaling section")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in workers")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the selected sections and write ``<results-dir>/<name>.json``; returns the results."""
    args = _parser().parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    sections = list(dict.fromkeys(args.sections + (["profile"] if args.profile else [])))
    name = args.name or "perturbation" + ("_profile" if sections == ["profile"] else "")
    name += ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")

    def log(message: str) -> None:
        print(message, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    flops_per_s = matmul_throughput(args.device, size=4096 if args.device == "cuda" else 2048)
    log(f"measured float32 matmul throughput: {flops_per_s / 1e9:.1f} GFLOP/s on {args.device}")
    results: dict[str, Any] = {
        "settings": {
            "designs": list(DESIGNS),
            "in_channels": IN_CHANNELS,
            "dim": DIM,
            "hidden": HIDDEN,
            "num_blocks": NUM_BLOCKS,
            "eps": EPS,
            "chunk_rows": args.chunk_rows,
            "quick": args.quick,
            "threads": torch.get_num_threads(),
            "sections": sections,
            "memory_measure": "CPU: growth of peak RSS (VmHWM) over RSS on the first call of a "
            "fresh worker process run with MALLOC_MMAP_THRESHOLD_=65536, so RSS follows live "
            "tensors; CUDA: growth of max_memory_allocated",
        },
        "matmul_gflop_per_s": flops_per_s / 1e9,
    }
    scratch = Path(tempfile.mkdtemp(prefix="ddfp_bench_"))
    started = time.perf_counter()
    try:
        if "shapes" in sections:
            results["shapes"] = run_shapes(args, scratch, flops_per_s, log)
            results["targets_b4_h129"] = _targets(results["shapes"])
        if "scaling" in sections:
            results["scaling"] = run_scaling(args, scratch, flops_per_s, log)
        if "profile" in sections:
            results["profile"] = run_profile(args, scratch, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["total_wall_s"] = time.perf_counter() - started
    command = ["python", "-m", MODULE, *(sys.argv[1:] if argv is None else argv)]
    path = write_results(name, results, args.results_dir, device=args.device, argv=command)
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
