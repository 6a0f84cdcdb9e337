"""Cost of one UniMatch iteration with each feature-perturbation stream, and where DDFP's time goes.

The iteration is the example loop's own ``train_step`` on its ``UniMatchDDFP`` streams and
DeepLabV3+ (random-init backbone), fed synthetic tensors of the loop's batch layout: a labelled batch
and the same number of unlabelled images (weak view, two strong views, padding mask, CutMix boxes,
plus the second unlabelled batch CutMix pastes from). Everything an iteration does is timed: the
CutMix pseudo-label pass, every stream's forward, the losses, backward, the SGD step and, for DDFP,
the flow's online step.

Every ``--fp`` configuration gets its own model built from the same seed, and the configurations
are timed in interleaved rounds in one process (``torch.utils.benchmark``, see
:func:`benchmarks.common.interleaved`), so that a change of machine load hits them alike. The clock
is ``--clock``: ``cpu``, this process's CPU time, which other processes on a shared machine disturb
far less (the default on the CPU), or ``wall``, synchronised on CUDA and MPS (the default there).

DDFP's cost is then split in three by ``torch.profiler``, over ``--profile-steps`` more iterations
of each configuration with a DDFP stream, from the ranges the loop marks with ``record_function``:

- perturbation (``ddfp_direction``): the call that computes ``delta`` (head forward, flow NLL and
  its gradient);
- perturbed branch (``ddfp_perturbed_branch``): ``upsample(classifier(head(v + delta)))``;
- flow update (``flow_update``): one step of the online flow trainer on the detached head features.

A part is its range plus the backward of the operations run inside it, wherever autograd runs that
backward (:func:`range_seconds`): the perturbed branch's share of the iteration's backward pass is
the branch's, although the loop runs it in its ``backward`` range. Each part is also given as a
share of the profiled iteration, measured the same way: host time on the CPU, kernel time on CUDA.
MPS gets no split (the profiler does not see its kernels).

    python -m benchmarks.train_step                           # CPU: ResNet-50, crop 129, 4+4
    python -m benchmarks.train_step --device cuda             # GPU: ResNet-101, crop 321, 4+4
    python -m benchmarks.train_step --quick                   # seconds, for tests

Writes ``benchmarks/results/train_step_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils import benchmark

from ddfp_lib import IGNORE_INDEX, ConsistencyLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    interleaved,
    make_timer,
    require_device,
    summary,
    synchronize,
    write_results,
)

__all__ = [
    "CLOCKS",
    "FP_CONFIGS",
    "SPLIT_PARTS",
    "STEP_RANGE",
    "LoopStep",
    "build_step",
    "load_loop",
    "main",
    "measure",
    "overheads",
    "parse_args",
    "profile_split",
    "range_seconds",
    "split_note",
    "split_overheads",
    "synthetic_batch",
]

LOOP_SCRIPT = REPO_ROOT / "examples" / "voc_unimatch_plus_ddfp.py"
FP_CONFIGS: tuple[str, ...] = ("none", "dropout", "ddfp", "both")
#: DDFP's three parts and the loop's ``record_function`` range of each.
SPLIT_PARTS: dict[str, str] = {
    "perturbation": "ddfp_direction",
    "perturbed_branch": "ddfp_perturbed_branch",
    "flow_update": "flow_update",
}
#: The range this benchmark puts around each call of the loop's ``train_step``.
STEP_RANGE = "train_step"
CLOCKS: dict[str, str] = {
    "wall": "timeit.default_timer, synchronised on CUDA and MPS",
    "cpu": "time.process_time of this process (all its threads)",
}
NUM_CLASSES = 21
_BACKWARD_NODE = "autograd::engine::evaluate_function: "

# Per device: backbone, crop, labelled (= unlabelled) images per iteration.
DEVICE_DEFAULTS: dict[str, tuple[str, int, int]] = {
    "cuda": ("resnet101", 321, 4),
    "cpu": ("resnet50", 129, 4),
    "mps": ("resnet50", 129, 4),
}


def load_loop() -> ModuleType:
    """Import ``examples/voc_unimatch_plus_ddfp.py`` as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("voc_unimatch_plus_ddfp", LOOP_SCRIPT)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the example loop from {LOOP_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class LoopStep:
    """One ``--fp`` configuration of the loop, ready to run ``train_step`` on a fixed batch.

    Attributes:
        loop: the loaded example loop (:func:`load_loop`).
        args: the loop's arguments; ``args.fp`` is the configuration.
        net: the loop's ``UniMatchDDFP`` streams.
        state: the loop's ``TrainingState`` (optimiser, losses, DDFP stream).
        device: where the iteration runs.
        batch: what the loop's loaders would yield (:func:`synthetic_batch`).
    """

    loop: ModuleType
    args: argparse.Namespace
    net: Any
    state: Any
    device: torch.device
    batch: tuple[Any, ...]

    @property
    def fp(self) -> str:
        return self.args.fp

    def __call__(self) -> dict[str, torch.Tensor]:
        with record_function(STEP_RANGE):
            logged = self.loop.train_step(
                self.net, [self.batch], self.state, self.args, self.device
            )
        synchronize(self.device)
        return logged


def synthetic_batch(
    batch_size: int, crop_size: int, device: torch.device, seed: int = 0
) -> tuple[Any, ...]:
    """Random tensors in the layout the loop's loaders yield.

    Args:
        batch_size: labelled images, and unlabelled images, per iteration.
        crop_size: S, the training crop.
        device: where the tensors live.
        seed: seed of the draw.

    Shape:
        ``((img_x, mask_x), (img_u_w, img_u_s1, img_u_s2, ignore_mask, box1, box2),
        (img_mix_w, img_mix_s1, img_mix_s2, ignore_mix, box1, box2))``: images (B, 3, S, S) float,
        label maps, padding masks and boxes (B, S, S) long. Labels are classes in ``0..20``; a
        quarter-wide band on the right of every unlabelled image is padding (255), and each box
        covers a quarter of the image.

    Returns:
        The batch.
    """
    if batch_size < 1 or crop_size < 8:
        raise ValueError(f"need batch_size >= 1 and crop_size >= 8, got {batch_size}, {crop_size}")
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, crop_size, crop_size)

    def images() -> torch.Tensor:
        return torch.randn(batch_size, 3, crop_size, crop_size, generator=generator)

    def unlabeled() -> tuple[torch.Tensor, ...]:
        ignore_mask = torch.zeros(shape, dtype=torch.long)
        ignore_mask[..., crop_size - crop_size // 4 :] = IGNORE_INDEX
        box = torch.zeros(shape, dtype=torch.long)
        box[:, : crop_size // 2, : crop_size // 2] = 1
        return images(), images(), images(), ignore_mask, box, box.flip(-1)

    labeled = (images(), torch.randint(0, NUM_CLASSES, shape, generator=generator))
    batch = (labeled, unlabeled(), unlabeled())
    return tuple(tuple(t.to(device) for t in part) for part in batch)


def build_step(
    loop: ModuleType,
    fp: str,
    backbone: str,
    crop_size: int,
    batch_size: int,
    device: torch.device,
    threshold: float,
    seed: int = 0,
) -> LoopStep:
    """The loop's model, streams, optimiser and DDFP stream for one ``--fp`` value.

    Args:
        loop: the loaded example loop (:func:`load_loop`).
        fp: "none", "dropout", "ddfp" or "both".
        backbone: "resnet50", "resnet101" or "mobilenet_v2".
        crop_size: training crop S.
        batch_size: labelled (and unlabelled) images per iteration.
        device: where to run.
        threshold: pseudo-label confidence threshold; the timed cost of DDFP does not depend on
            it (the density gradient is taken over every pixel), but the losses' masks do.
        seed: seed of the model's and the flow's initialisation.

    Returns:
        A callable running one iteration.
    """
    if fp not in FP_CONFIGS:
        raise ValueError(f"fp must be one of {FP_CONFIGS}, got {fp!r}")
    args = loop.parse_args(
        [
            "--dataset", "voc", "--num-labeled", "1", "--fp", fp, "--backbone", backbone,
            "--crop-size", str(crop_size), "--batch-size", str(batch_size),
            "--threshold", str(threshold), "--device", device.type, "--seed", str(seed),
        ]
    )  # fmt: skip
    # On the path once the loop is loaded.
    from ddfp_examples.datasets import DATASETS
    from ddfp_examples.models import build_deeplabv3plus
    from ddfp_examples.training_state import (
        TrainingState,
        build_density_stream,
        build_optimizer,
    )

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_deeplabv3plus(backbone, NUM_CLASSES, backbone_weights=None)
    model.to(device)
    net = loop.UniMatchDDFP(model, fp, aux_bn=False, threshold=threshold).to(device)
    ddfp = None
    if net.density_fp:
        ddfp = build_density_stream(args, model, DATASETS[args.dataset], 10**6, device)
    state = TrainingState(
        optimizer=build_optimizer(model, args),
        scaler=torch.amp.GradScaler(device.type, enabled=False),
        amp_dtype=None,
        consistency=ConsistencyLoss(threshold=threshold, ignore_index=IGNORE_INDEX),
        ddfp=ddfp,
    )
    batch = synthetic_batch(batch_size, crop_size, device, seed)
    return LoopStep(loop, args, net, state, device, batch)


def measure(
    steps: list[LoopStep], repeats: int, warmup: int, clock: str = "wall"
) -> dict[str, benchmark.Measurement]:
    """Time every step in interleaved rounds: ``warmup`` untimed rounds, then ``repeats`` timed ones.

    Args:
        steps: one per configuration.
        repeats: timed rounds (>= 1); in each, every step runs once untimed, then once timed.
        warmup: untimed rounds first.
        clock: a key of :data:`CLOCKS`.

    Returns:
        Per configuration, the ``Measurement`` of its iteration, one time per round.
    """
    if warmup < 0 or clock not in CLOCKS:
        raise ValueError(f"need warmup >= 0 and a clock in {list(CLOCKS)}, got {warmup}, {clock}")
    for _ in range(warmup):
        for step in steps:
            step()
    label = f"train_step, {clock} clock"
    timers = {
        step.fp: make_timer(
            step,
            step.device,
            clock=time.process_time if clock == "cpu" else None,
            label=label,
            sub_label=step.fp,
            description="s per iteration",
        )
        for step in steps
    }
    return interleaved(timers, repeats)


def range_seconds(events: list[Any], name: str, device_time: bool = False) -> list[float]:
    """Seconds of every ``record_function(name)`` range of a profile, with its operations' backward.

    The profiler marks an operation and the autograd node that computes its backward with the same
    sequence number (and the forward's thread). A node evaluated outside the range (in a later
    ``backward()``, or on CUDA in autograd's device thread) is added to the range's time; one
    evaluated inside it (``torch.autograd.grad`` within the range, on the CPU) is in it already.

    Args:
        events: ``prof.events()`` of a finished ``torch.profiler.profile``.
        name: the range.
        device_time: count the CUDA kernels' time instead of the host's.

    Returns:
        One time per range, in the order the ranges ran.
    """

    def seconds(event: Any) -> float:
        return (event.device_time_total if device_time else event.cpu_time_total) / 1e6

    backward: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for event in events:
        if event.name.startswith(_BACKWARD_NODE):
            backward[(event.fwd_thread, event.sequence_nr)].append(event)
    times = []
    for event in events:
        # On CUDA the profiler also lists each range's span on the device under the same name.
        if event.name != name or event.device_type != DeviceType.CPU:
            continue
        inside, stack = {}, [event]
        while stack:
            child = stack.pop()
            inside[child.id] = child
            stack += child.cpu_children
        keys = {(e.thread, e.sequence_nr) for e in inside.values() if e.sequence_nr >= 0}
        linked = {b.id: b for key in keys for b in backward.get(key, ()) if b.id not in inside}
        times.append(seconds(event) + sum(seconds(b) for b in linked.values()))
    return times


def profile_split(step: LoopStep, iterations: int) -> dict[str, Any]:
    """DDFP's three parts in ``iterations`` profiled iterations of ``step`` (which has DDFP).

    Returns:
        ``"step"`` (the whole iteration) and ``"split"`` (per part of :data:`SPLIT_PARTS`):
        ``{"median", "times"}``, seconds by :func:`range_seconds`, one time per iteration;
        ``"split_share_of_step"``: each part's median over the iteration's.
    """
    device_time = step.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_time else [])
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            step()
    events = prof.events()

    def timed(name: str) -> dict[str, Any]:
        times = range_seconds(events, name, device_time)
        if len(times) != iterations:
            raise RuntimeError(
                f"{iterations} profiled iterations hold {len(times)} {name!r} ranges: the loop's "
                "record_function ranges are not the ones this benchmark reads"
            )
        return {"median": statistics.median(times), "times": times}

    whole = timed(STEP_RANGE)
    split = {part: timed(name) for part, name in SPLIT_PARTS.items()}
    shares = {part: split[part]["median"] / whole["median"] for part in split}
    return {"step": whole, "split": split, "split_share_of_step": shares}


def overheads(configs: dict[str, Any], clock: str) -> dict[str, float]:
    """Relative cost of the DDFP stream, from the median step times of ``clock``.

    ``both_vs_dropout`` is UniMatch with DDFP added over UniMatch (the comparison behind the
    paper's "about 10 %"), ``ddfp_vs_dropout`` DDFP in place of dropout FP, ``ddfp_vs_none`` DDFP
    over no FP stream, ``dropout_vs_none`` UniMatch's dropout stream over none.
    """
    median = {fp: entry[clock]["step"]["median"] for fp, entry in configs.items()}
    pairs = {
        "both_vs_dropout": ("both", "dropout"),
        "ddfp_vs_dropout": ("ddfp", "dropout"),
        "ddfp_vs_none": ("ddfp", "none"),
        "dropout_vs_none": ("dropout", "none"),
    }
    return {
        name: median[a] / median[b] - 1.0
        for name, (a, b) in pairs.items()
        if a in median and b in median
    }


def split_overheads(configs: dict[str, Any]) -> dict[str, float]:
    """``split_<fp>``: DDFP's three parts over the rest of the same profiled iterations.

    The overhead measured without comparing two models, so less exposed to the machine's load
    drifting between them.
    """
    found = {}
    for fp, entry in configs.items():
        if "profile" in entry:
            profiled = entry["profile"]
            parts = sum(profiled["split"][part]["median"] for part in SPLIT_PARTS)
            found[f"split_{fp}"] = parts / (profiled["step"]["median"] - parts)
    return found


def split_note(device: torch.device, iterations: int) -> str:
    """How the split of a run on ``device`` is measured, in a sentence for the results page."""
    if device.type == "mps":
        return "There is no split on MPS: the profiler does not see its kernels."
    measured = "kernel time" if device.type == "cuda" else "host time"
    return (
        f"DDFP's three parts come from torch.profiler, over {iterations} profiled iteration(s) "
        "of each configuration with DDFP after the timed rounds: each part is one of the loop's "
        "record_function ranges (ddfp_direction, ddfp_perturbed_branch, flow_update) plus the "
        "backward of the operations run inside it, which the profiler links to them by autograd "
        f"sequence number ({measured}), and its share is of the profiled iteration, measured "
        "the same way."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu")
    parser.add_argument(
        "--backbone",
        choices=["resnet50", "resnet101", "mobilenet_v2"],
        help="default: resnet101 on cuda, resnet50 on cpu and mps",
    )
    parser.add_argument("--crop-size", type=int, help="default: 321 cuda, 129 cpu and mps")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="labelled (= unlabelled) images per iteration; default: 4",
    )
    parser.add_argument("--fp", nargs="+", choices=FP_CONFIGS, default=list(FP_CONFIGS))
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed rounds (each after an untimed call)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--clock", choices=sorted(CLOCKS), help="default: cpu on cpu, else wall")
    parser.add_argument(
        "--profile-steps", type=int, default=2, help="profiled iterations per DDFP configuration"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="pseudo-label confidence threshold (0 keeps every pixel in the losses' masks)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for tests: mobilenet_v2, crop 33, 1+1 images, 2 rounds, 1 profiled step",
    )
    parser.add_argument("--name", help="results file stem (default: train_step_<device>)")
    parser.add_argument("--results-dir", type=Path, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    backbone, crop_size, batch_size = DEVICE_DEFAULTS[args.device]
    if args.quick:
        backbone, crop_size, batch_size = "mobilenet_v2", 33, 1
        args.repeats, args.warmup, args.profile_steps = 2, 0, 1
    args.backbone = args.backbone or backbone
    args.crop_size = args.crop_size or crop_size
    args.batch_size = args.batch_size or batch_size
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    args.name = args.name or f"train_step_{args.device}{'_quick' if args.quick else ''}"
    return args


def report(
    measured: dict[str, benchmark.Measurement],
    configs: dict[str, Any],
    overhead: dict[str, dict[str, float]],
) -> str:
    """The step times as ``torch.utils.benchmark.Compare`` prints them, the split, the overheads."""
    lines = [str(benchmark.Compare(list(measured.values())))]
    for fp, entry in configs.items():
        if "profile" in entry:
            shares = entry["profile"]["split_share_of_step"]
            parts = ", ".join(f"{part} {100 * share:.1f} %" for part, share in shares.items())
            lines.append(f"{fp}, share of the profiled iteration: {parts}")
    for source, found in overhead.items():
        values = ", ".join(f"{name} {100 * value:+.1f} %" for name, value in found.items())
        lines.append(f"overhead ({source}): {values}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write its JSON and return what was written under ``"results"``."""
    args = parse_args(argv)
    device = require_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loop = load_loop()
    steps = [
        build_step(loop, fp, args.backbone, args.crop_size, args.batch_size, device, args.threshold)
        for fp in args.fp
    ]
    measured = measure(steps, args.repeats, args.warmup, args.clock)
    configs: dict[str, Any] = {fp: {args.clock: {"step": summary(m)}} for fp, m in measured.items()}
    profiled = device.type != "mps"
    for step in steps:
        if profiled and step.net.density_fp:
            configs[step.fp]["profile"] = profile_split(step, args.profile_steps)
    overhead = {args.clock: overheads(configs, args.clock), "profile": split_overheads(configs)}
    payload = {
        "setup": {
            "backbone": args.backbone,
            "backbone_init": "random",
            "crop_size": args.crop_size,
            "labeled_per_iteration": args.batch_size,
            "unlabeled_per_iteration": args.batch_size,
            "num_classes": NUM_CLASSES,
            "threshold": args.threshold,
            "eps": steps[0].args.eps,
            "flow_samples": steps[0].args.flow_samples,
            "amp": "none",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "interleaved": True,
            "torch_threads": torch.get_num_threads(),
            "clocks": {args.clock: CLOCKS[args.clock]},
            "profile_steps": args.profile_steps if profiled else 0,
            "split": split_note(device, args.profile_steps),
        },
        "configs": configs,
        "overhead": overhead,
    }
    path = write_results(args.name, payload, args.results_dir, device=device)
    print(report(measured, configs, overhead))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
