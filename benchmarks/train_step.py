"""Cost of one UniMatch iteration with each feature-perturbation stream, and where DDFP's time goes.

The iteration is the example loop's own ``train_iteration`` on its ``UniMatchDDFP`` streams and
DeepLabV3+ (random-init backbone), fed synthetic tensors of the loop's batch layout: a labelled batch
and the same number of unlabelled images (weak view, two strong views, padding mask, CutMix boxes,
plus the second unlabelled batch CutMix pastes from). Everything an iteration does is timed: the
CutMix pseudo-label pass, every stream's forward, the losses, backward, the SGD step and, for DDFP,
the flow's online step.

Every ``--fp`` configuration gets its own model built from the same seed, and the configurations
are timed in interleaved rounds in one process, so that a change of machine load hits them alike.
DDFP's cost is split in three, timed inside the same iterations:

- perturbation: the call that computes ``delta`` (head forward, flow NLL and its gradient);
- perturbed branch: ``classifier(head(v + delta))`` forward plus its share of the backward pass
  (timed from the gradient reaching its logits to the gradient reaching ``v + delta``);
- flow update: one step of the online flow trainer on the detached head features.

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
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    Timing,
    require_device,
    synchronize,
    write_results,
)

__all__ = [
    "FP_CONFIGS",
    "SPLIT_PARTS",
    "SplitTimer",
    "TimedStep",
    "build_step",
    "load_loop",
    "main",
    "measure",
    "parse_args",
    "synthetic_batch",
]

LOOP_SCRIPT = REPO_ROOT / "examples" / "voc_unimatch_plus_ddfp.py"
FP_CONFIGS: tuple[str, ...] = ("none", "dropout", "ddfp", "both")
SPLIT_PARTS: tuple[str, ...] = ("perturbation", "perturbed_branch", "flow_update")
NUM_CLASSES = 21
IGNORE_INDEX = 255

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


class SplitTimer:
    """Seconds spent in each of the three parts of DDFP's cost within the current iteration.

    Two clocks: wall time (synchronised on CUDA, so a part's time is its own work and not the queue
    before it) and this process's CPU time, which other processes on a shared machine disturb far
    less; with one CPU thread it is the work done.

    Args:
        device: the device the iteration runs on.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(SPLIT_PARTS, 0.0)
        self.cpu_seconds = dict.fromkeys(SPLIT_PARTS, 0.0)
        self._branch_backward_start: tuple[float, float] | None = None

    def reset(self) -> None:
        """Zero every part before a new iteration."""
        self.seconds = dict.fromkeys(SPLIT_PARTS, 0.0)
        self.cpu_seconds = dict.fromkeys(SPLIT_PARTS, 0.0)
        self._branch_backward_start = None

    def now(self) -> tuple[float, float]:
        """Synchronised ``(time.perf_counter(), time.process_time())``."""
        synchronize(self.device)
        return time.perf_counter(), time.process_time()

    def add(self, part: str, start: tuple[float, float]) -> None:
        """Add the time since ``start`` (from :meth:`now`) to ``part``."""
        wall, cpu = self.now()
        self.seconds[part] += wall - start[0]
        self.cpu_seconds[part] += cpu - start[1]

    def branch_backward_started(self, grad: torch.Tensor) -> None:
        """Gradient hook on the perturbed branch's logits: its backward begins."""
        self._branch_backward_start = self.now()

    def branch_backward_ended(self, grad: torch.Tensor) -> None:
        """Gradient hook on the perturbed decoder input: its backward is done."""
        if self._branch_backward_start is not None:
            self.add("perturbed_branch", self._branch_backward_start)
            self._branch_backward_start = None


class _TimedPerturbation:
    """Calls the loop's perturbation and times the call as the ``perturbation`` part."""

    def __init__(self, perturbation: Any, timer: SplitTimer):
        self.perturbation = perturbation
        self.timer = timer

    def __call__(self, *inputs: Any, **kw: Any) -> torch.Tensor:
        start = self.timer.now()
        perturbed = self.perturbation(*inputs, **kw)
        self.timer.add("perturbation", start)
        return perturbed


class _TimedFlowTrainer:
    """Calls the loop's online flow trainer and times each step as the ``flow_update`` part."""

    def __init__(self, trainer: Any, timer: SplitTimer):
        self.trainer = trainer
        self.timer = timer

    def step(self, *inputs: Any, **kw: Any) -> torch.Tensor:
        start = self.timer.now()
        nll = self.trainer.step(*inputs, **kw)
        self.timer.add("flow_update", start)
        return nll


def _timed_streams_class(loop: ModuleType) -> type:
    class TimedStreams(loop.UniMatchDDFP):
        """The loop's streams, with the perturbed branch's forward and backward timed."""

        timer: SplitTimer

        def perturbed_decode(self, v: torch.Tensor) -> torch.Tensor:
            start = self.timer.now()
            if v.requires_grad:
                v.register_hook(self.timer.branch_backward_ended)
            logits = super().perturbed_decode(v)
            self.timer.add("perturbed_branch", start)
            if logits.requires_grad:
                logits.register_hook(self.timer.branch_backward_started)
            return logits

    return TimedStreams


class TimedStep:
    """One ``--fp`` configuration of the loop, ready to run ``train_iteration`` on a fixed batch.

    Attributes:
        fp: the loop's ``--fp`` value.
        timer: the DDFP split of the last iteration (zeros where there is no DDFP stream).
    """

    def __init__(
        self,
        loop: ModuleType,
        args: argparse.Namespace,
        net: Any,
        state: dict[str, Any],
        ctx: Any,
        batch: tuple[Any, ...],
    ):
        self.loop = loop
        self.args = args
        self.net = net
        self.state = state
        self.ctx = ctx
        self.batch = batch
        self.fp = args.fp
        self.timer: SplitTimer = net.timer

    def __call__(self) -> dict[str, torch.Tensor]:
        self.timer.reset()
        logged = self.loop.train_iteration(self.net, self.batch, self.state, self.args, self.ctx)
        synchronize(self.ctx.device)
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
) -> TimedStep:
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
    ctx = loop.DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = loop.build_deeplabv3plus(backbone, NUM_CLASSES, backbone_weights=None)
    model.to(device)
    timer = SplitTimer(device)
    net = _timed_streams_class(loop)(model, fp, aux_bn=False).to(device)
    net.timer = timer
    state: dict[str, Any] = {
        "optimizer": loop.build_optimizer(model, args),
        "scaler": torch.amp.GradScaler(device.type, enabled=False),
        "amp_dtype": None,
        "consistency": loop.ConsistencyLoss(threshold=threshold, ignore_index=IGNORE_INDEX),
        "estimator": None,
        "flow_trainer": None,
        "perturbation": None,
        "perturbation_head": None,
    }
    if net.density_fp:
        spec = loop.DATASETS[args.dataset]
        stream = loop.build_density_stream(args, model, spec, 10**6, device)
        state.update(stream)
        state["perturbation"] = _TimedPerturbation(stream["perturbation"], timer)
        state["flow_trainer"] = _TimedFlowTrainer(stream["flow_trainer"], timer)
    batch = synthetic_batch(batch_size, crop_size, device, seed)
    return TimedStep(loop, args, net, state, ctx, batch)


def _summary(times: list[float]) -> dict[str, Any]:
    timing = Timing.from_times(times).as_dict()
    timing["mean"] = statistics.fmean(times)
    return timing


def measure(steps: list[TimedStep], repeats: int, warmup: int) -> dict[str, Any]:
    """Time every step in interleaved rounds: ``warmup`` untimed rounds, then ``repeats`` timed ones.

    Args:
        steps: one per configuration.
        repeats: timed rounds (>= 1).
        warmup: untimed rounds first.

    Returns:
        Per configuration, for each clock (``"wall"``, ``"cpu"``): ``"step"``
        (:class:`~benchmarks.common.Timing` fields in seconds, plus the mean) and, with a DDFP
        stream, ``"split"``: the same for every part of :data:`SPLIT_PARTS`, and
        ``"split_share_of_step"``, each part's median over the step's median.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        for step in steps:
            step()
    clocks = ("wall", "cpu")
    step_times = {clock: {step.fp: [] for step in steps} for clock in clocks}
    part_times = {
        clock: {step.fp: {part: [] for part in SPLIT_PARTS} for step in steps} for clock in clocks
    }
    for _ in range(repeats):
        for step in steps:
            start = step.timer.now()
            step()
            end = step.timer.now()
            for index, clock in enumerate(clocks):
                step_times[clock][step.fp].append(end[index] - start[index])
            for part in SPLIT_PARTS:
                part_times["wall"][step.fp][part].append(step.timer.seconds[part])
                part_times["cpu"][step.fp][part].append(step.timer.cpu_seconds[part])
    results: dict[str, Any] = {}
    for step in steps:
        results[step.fp] = {}
        for clock in clocks:
            entry: dict[str, Any] = {"step": _summary(step_times[clock][step.fp])}
            if step.net.density_fp:
                parts = part_times[clock][step.fp]
                entry["split"] = {part: _summary(parts[part]) for part in SPLIT_PARTS}
                entry["split_share_of_step"] = {
                    part: entry["split"][part]["median"] / entry["step"]["median"]
                    for part in SPLIT_PARTS
                }
            results[step.fp][clock] = entry
    return results


def overheads(results: dict[str, Any], clock: str = "wall") -> dict[str, float]:
    """Relative cost of the DDFP stream, from the median step times of ``clock``.

    Across configurations: ``both_vs_dropout`` is UniMatch with DDFP added over UniMatch (the
    comparison behind the paper's "about 10 %"), ``ddfp_vs_dropout`` DDFP in place of dropout FP,
    ``ddfp_vs_none`` DDFP over no FP stream. Within one configuration, ``split_<fp>`` is the sum of
    the three DDFP parts over the rest of the same iterations: the same overhead measured without
    comparing two models, so less exposed to the machine's load drifting between them.
    """
    median = {fp: entry[clock]["step"]["median"] for fp, entry in results.items()}
    pairs = {
        "both_vs_dropout": ("both", "dropout"),
        "ddfp_vs_dropout": ("ddfp", "dropout"),
        "ddfp_vs_none": ("ddfp", "none"),
        "dropout_vs_none": ("dropout", "none"),
    }
    found = {
        name: median[a] / median[b] - 1.0
        for name, (a, b) in pairs.items()
        if a in median and b in median
    }
    for fp, entry in results.items():
        if "split" in entry[clock]:
            parts = sum(entry[clock]["split"][part]["median"] for part in SPLIT_PARTS)
            found[f"split_{fp}"] = parts / (median[fp] - parts)
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu")
    parser.add_argument(
        "--backbone",
        choices=["resnet50", "resnet101", "mobilenet_v2"],
        default=None,
        help="default: resnet101 on cuda, resnet50 on cpu and mps",
    )
    parser.add_argument(
        "--crop-size", type=int, default=None, help="default: 321 cuda, 129 cpu and mps"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="labelled (= unlabelled) images per iteration; default: 4",
    )
    parser.add_argument("--fp", nargs="+", choices=FP_CONFIGS, default=list(FP_CONFIGS))
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="pseudo-label confidence threshold (0 keeps every pixel in the losses' masks)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for tests: mobilenet_v2, crop 33, 1+1 images, 1 warm-up, 2 rounds",
    )
    parser.add_argument(
        "--name", default=None, help="results file stem (default: train_step_<device>)"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="default: benchmarks/results"
    )
    args = parser.parse_args(argv)
    backbone, crop_size, batch_size = DEVICE_DEFAULTS[args.device]
    if args.quick:
        backbone, crop_size, batch_size = "mobilenet_v2", 33, 1
        args.repeats, args.warmup = 2, 1
    args.backbone = args.backbone or backbone
    args.crop_size = args.crop_size or crop_size
    args.batch_size = args.batch_size or batch_size
    args.name = args.name or f"train_step_{args.device}{'_quick' if args.quick else ''}"
    return args


def format_table(results: dict[str, Any], overhead: dict[str, dict[str, float]]) -> str:
    """Median (IQR) milliseconds per step and the DDFP split, for both clocks, as aligned text."""
    lines = []
    for clock in ("wall", "cpu"):
        lines.append(
            f"{clock:<8} {'step ms (IQR)':>17}  " + "  ".join(f"{p:>20}" for p in SPLIT_PARTS)
        )
        for fp, entries in results.items():
            entry = entries[clock]
            step = entry["step"]
            row = f"{fp:<8} {1e3 * step['median']:>9.1f} ({1e3 * step['iqr']:>5.1f})  "
            if "split" in entry:
                row += "  ".join(
                    f"{1e3 * entry['split'][p]['median']:>9.1f} ms ({100 * entry['split_share_of_step'][p]:>4.1f} %)"
                    for p in SPLIT_PARTS
                )
            lines.append(row.rstrip())
        lines.append(
            "overhead: "
            + ", ".join(f"{name} {100 * value:+.1f} %" for name, value in overhead[clock].items())
        )
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
    results = measure(steps, args.repeats, args.warmup)
    overhead = {clock: overheads(results, clock) for clock in ("wall", "cpu")}
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
            "clocks": {
                "wall": "time.perf_counter, synchronised on CUDA",
                "cpu": "time.process_time of this process (all its threads)",
            },
        },
        "configs": results,
        "overhead": overhead,
    }
    path = write_results(args.name, payload, args.results_dir, device=device)
    print(format_table(results, overhead))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
