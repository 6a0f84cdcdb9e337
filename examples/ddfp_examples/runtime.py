"""What a training run needs besides the algorithm: processes, seeding, checkpoints, progress, logs."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

__all__ = [
    "AMP_DTYPES",
    "BAR_KEYS",
    "Progress",
    "evaluate_run",
    "final_iou_table",
    "finish_run",
    "foreground_scores",
    "progress_bar",
    "record_evaluation",
    "report",
    "restore_run",
    "run_summary",
    "save_run",
    "DEVICES",
    "CsvLog",
    "DistributedContext",
    "EpochSampler",
    "SeededItems",
    "StopRequest",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "setup_distributed",
    "amp_dtype",
    "ddp_device_ids",
    "grad_scaler",
    "mps_available",
    "pin_memory",
    "process_group_backend",
    "select_device",
    "uses_sync_batchnorm",
]

#: What ``--device`` accepts; "auto" picks CUDA, then MPS (Apple silicon), then the CPU.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
#: ``--amp`` -> the autocast dtype (None: full precision).
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class DistributedContext:
    """Where this process runs: rank, world size and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def mps_available() -> bool:
    """Whether this PyTorch build sees an Apple-silicon GPU (Metal Performance Shaders)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of this process.

    Args:
        requested: one of :data:`DEVICES`; "auto" takes CUDA if there is one, else MPS, else the CPU.
        local_rank: the CUDA device index of this process (torchrun's ``LOCAL_RANK``).

    Raises:
        ValueError: an unknown name, or a device that this machine does not have.
    """
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {requested!r}")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if requested == "mps":
        if not mps_available():
            raise ValueError(
                "--device mps was asked for, but torch sees no MPS device (it needs Apple silicon "
                "and a PyTorch build with MPS)"
            )
        return torch.device("mps")
    return torch.device("cpu")


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA processes, gloo for CPU ones.

    Raises:
        ValueError: for MPS: a Mac has one such device, and no backend all-reduces MPS tensors.
    """
    if device.type == "cuda":
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise ValueError(
        f"several processes on {device.type} are not supported: run one process, or use "
        "--device cpu under torchrun"
    )


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the torchrun process group when its environment variables are set; else one process.

    ``device``: one of :data:`DEVICES` (see :func:`select_device`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = select_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = process_group_backend(target)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank, target)


def pin_memory(device: torch.device) -> bool:
    """Whether data loaders should pin host memory: only for copies to CUDA (MPS shares memory)."""
    return device.type == "cuda"


def uses_sync_batchnorm(ctx: DistributedContext) -> bool:
    """Whether BatchNorm layers become SyncBatchNorm: several CUDA processes (it needs NCCL)."""
    return ctx.distributed and ctx.device.type == "cuda"


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """``device_ids`` of DistributedDataParallel: the CUDA index, None for the CPU."""
    return [device.index or 0] if device.type == "cuda" else None


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device`` (None: no autocast).

    Raises:
        ValueError: an unknown ``amp``, or a device type on which this PyTorch has no autocast.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if dtype is not None and is_available is not None and not is_available(device.type):
        raise ValueError(f"--amp {amp}: this PyTorch has no autocast on {device.type}")
    return dtype


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of ``--amp``: on for fp16 (whose gradients underflow), off otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def _item_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    mixed = (seed * 1_000_003 + stream) * 1_000_033 + epoch
    return (mixed * 2_654_435_761 + index) % (2**63 - 1)


class SeededItems(Dataset):
    """A dataset whose item ``(epoch, index)`` is augmented from its own seed.

    The augmentation of a sample then depends on the run seed, the stream, the epoch and the index
    only: not on worker count, on the order of loading, or on what ran before. That is what lets a
    resumed run skip the batches it already trained on and continue bit for bit.
    """

    def __init__(self, dataset: Dataset, seed: int, stream: int):
        self.dataset = dataset
        self.seed = seed
        self.stream = stream

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_item_seed(self.seed, self.stream, epoch, index))
            return self.dataset[index]


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys in a per-epoch seeded order, optionally from an offset.

    Shards over ranks like DistributedSampler. ``start`` skips the first ``start`` keys of the
    current epoch (without loading them), for resuming inside an epoch.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        stream: int,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
    ):
        self.size = size
        self.seed = seed
        self.stream = stream
        self.shuffle = shuffle
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.size))
        else:
            generator = torch.Generator().manual_seed(
                _item_seed(self.seed, self.stream, self.epoch, -1)
            )
            order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = -(-self.size // self.world_size)
        order = (order * -(-per_rank * self.world_size // max(len(order), 1)))[
            : per_rank * self.world_size
        ]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._order()[self.start :]:
            yield (self.epoch, index)


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU, CUDA and MPS where present), numpy and Python."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and mps_available():
        torch.mps.set_rng_state(state["mps"])


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=device, weights_only=False)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations, so a stop saves first.

    A second Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class CsvLog:
    """Append rows of named values to a CSV file (header written once), and to TensorBoard if present."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fields: list[str] | None = None
        if path.exists():
            with open(path, newline="") as file:
                header = next(csv.reader(file), None)
            self._fields = header
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                self._writer = None

    def write(self, row: dict[str, Any]) -> None:
        if self._fields is None:
            self._fields = list(row)
            with open(self.path, "w", newline="") as file:
                csv.writer(file).writerow(self._fields)
        new_fields = [k for k in row if k not in self._fields]
        if new_fields:
            # A stream that starts later (e.g. after a warm-up) gets its column; old rows stay.
            with open(self.path, newline="") as file:
                old_rows = list(csv.DictReader(file))
            self._fields += new_fields
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", newline="") as file:
                writer = csv.DictWriter(file, self._fields, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
            os.replace(tmp, self.path)
        with open(self.path, "a", newline="") as file:
            csv.writer(file).writerow([row.get(k, "") for k in self._fields])
        if self._writer is not None:
            step = int(row.get("iteration", 0))
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint (as a dict) so that a resumed run continues.

    Attributes:
        epoch: epochs completed.
        step_in_epoch: iterations done in the current epoch.
        iteration: iterations done in all.
        best_miou: best val mIoU so far (-1 before the first evaluation).
        history: one entry per evaluation: epoch, iteration, miou, per-class iou, extra scores.
        seconds: training + evaluation time so far, over every part of an interrupted run.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    iteration: int = 0
    best_miou: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def save_run(
    path: Path,
    model: torch.nn.Module,
    state: Any,
    progress: Progress,
    args: Any,
    ctx: DistributedContext,
) -> None:
    """Everything needed to continue exactly: weights, optimiser, scaler, flow, position, RNG.

    ``state`` is the loop's training state (``optimizer``, ``scaler``, ``estimator``,
    ``flow_trainer``, ``teacher``). Every process takes part (the RNG states are gathered); the main one writes.
    """
    rng = [rng_state()]
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if not ctx.is_main:
        return
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "progress": asdict(progress),
        "rng": rng,
        "args": vars(args),
    }
    if state.estimator is not None:
        checkpoint["flow"] = state.estimator.state_dict()
        checkpoint["flow_trainer"] = state.flow_trainer.state_dict()
    if state.teacher is not None:
        checkpoint["teacher"] = state.teacher.state_dict()
    save_checkpoint(checkpoint, path)


def restore_run(
    path: Path, model: torch.nn.Module, state: Any, ctx: DistributedContext
) -> Progress:
    """Load a checkpoint of :func:`save_run` into ``model`` and ``state``; return its progress and
    set this process's RNG state."""
    checkpoint = load_checkpoint(path, ctx.device)
    model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    if state.estimator is not None:
        if "flow" not in checkpoint:
            raise ValueError(
                "the checkpoint has no flow: it was saved by a run without a DDFP stream"
            )
        state.estimator.load_state_dict(checkpoint["flow"])
        state.flow_trainer.load_state_dict(checkpoint["flow_trainer"])
    if state.teacher is not None:
        if "teacher" not in checkpoint:
            raise ValueError(
                "the checkpoint has no mean teacher: it was saved by a run without --ema"
            )
        state.teacher.load_state_dict(checkpoint["teacher"])
    set_rng_state(checkpoint["rng"][min(ctx.rank, len(checkpoint["rng"]) - 1)])
    return Progress(**checkpoint["progress"])


def progress_bar(batches: Iterator[Any], total: int, start: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over ``batches`` (``start`` of ``total`` done already), or the batches as they are."""
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, initial=start, desc=desc, dynamic_ncols=True, leave=True)


#: The logged values the progress bar shows (every one goes to the CSV log).
BAR_KEYS = ("loss", "loss_x", "loss_s1", "loss_fp", "loss_ddfp", "flow_nll", "confident")


def report(
    logged: dict[str, torch.Tensor],
    bar: Any,
    log: CsvLog | None,
    progress: Progress,
    lr: float,
    images_per_s: float,
    log_every: int,
) -> None:
    """Show an iteration's values on the bar and write every ``log_every``-th to the CSV log."""
    values = {k: float(v) for k, v in logged.items()}
    values["img_per_s"] = images_per_s
    if hasattr(bar, "set_postfix"):
        shown = {k: f"{v:.3f}" for k, v in values.items() if k in BAR_KEYS}
        bar.set_postfix(shown | {"img/s": f"{images_per_s:.1f}"})
    if progress.iteration % log_every == 0 and log is not None:
        log.write({"iteration": progress.iteration, "epoch": progress.epoch, "lr": lr, **values})


def foreground_scores(meter: Any, class_names: list[str]) -> dict[str, float]:
    """For datasets whose class 0 is background: are objects found, and are they named right?"""
    if class_names[0] != "background":
        return {}
    return {
        "foreground IoU": meter.foreground_iou(0),
        "foreground accuracy": meter.foreground_accuracy(0),
    }


def record_evaluation(
    meter: Any,
    progress: Progress,
    class_names: list[str],
    is_main: bool,
    extra: dict[str, float] | None = None,
) -> bool:
    """Append an evaluation to the history, print it on the main process; True for a new best.

    ``extra``: more scores to keep and show (e.g. the mean teacher's mIoU); the best is the
    model's own mIoU.
    """
    import math

    miou = meter.miou()
    scores = foreground_scores(meter, class_names) | dict(extra or {})
    progress.history.append(
        {
            "epoch": progress.epoch,
            "iteration": progress.iteration,
            "miou": miou,
            "iou": [None if math.isnan(x) else x for x in meter.per_class_iou().tolist()],
            "extra": scores,
        }
    )
    if is_main:
        shown = "".join(f", {name} {100 * value:.2f}" for name, value in scores.items())
        print(
            f"[ddfp] epoch {progress.epoch}: mIoU {100 * miou:.2f}"
            f" (best {100 * max(miou, progress.best_miou):.2f}){shown}"
        )
    best = miou > progress.best_miou
    if best:
        progress.best_miou = miou
    return best


def run_summary(
    progress: Progress, args: Any, class_names: list[str], stopped: bool
) -> dict[str, Any]:
    """What ``summary.json`` holds: the run's setting, its final and best scores, its time."""
    last = progress.history[-1] if progress.history else None
    return {
        "mode": args.mode,
        "fp": args.fp,
        "perturbation": args.perturbation,
        "dataset": args.dataset,
        "iterations": progress.iteration,
        "best_miou": progress.best_miou,
        "final_miou": last["miou"] if last else None,
        "final_scores": last.get("extra", {}) if last else {},
        "final_iou_per_class": dict(zip(class_names, last["iou"])) if last else {},
        "seconds": progress.seconds,
        "stopped_early": stopped,
    }


def final_iou_table(progress: Progress, args: Any, class_names: list[str]) -> str:
    """The per-class IoU table of the last evaluation, titled with the run's setting."""
    from .metrics import format_iou_table

    last = progress.history[-1]
    title = (
        f"{args.dataset} | mode={args.mode} fp={args.fp} | {progress.iteration} iterations | "
        f"best mIoU {100 * progress.best_miou:.2f}"
    )
    return format_iou_table(last["iou"], class_names, title, last.get("extra"))


def evaluate_run(
    model: torch.nn.Module,
    teacher: Any,
    loader: Any,
    spec: Any,
    args: Any,
    ctx: DistributedContext,
) -> tuple[Any, dict[str, float]]:
    """Val IoU of ``model`` at the run's scales and flips, and the mean teacher's mIoU beside it
    (``{"teacher mIoU": ...}``, once the teacher has taken a step; ``{}`` without one)."""
    from .metrics import evaluate

    def score(network: torch.nn.Module) -> Any:
        return evaluate(
            network, loader, spec.num_classes, ctx.device, mode=spec.eval_mode,
            window=args.crop_size, amp_dtype=amp_dtype(args.amp, ctx.device),
            scales=args.eval_scales, flip=args.eval_flip,
        )  # fmt: skip

    extra = {}
    if teacher is not None and teacher.steps > 0:
        extra["teacher mIoU"] = score(teacher.model).miou()
    return score(model), extra


def finish_run(
    progress: Progress,
    args: Any,
    class_names: list[str],
    stopped: bool,
    log: CsvLog | None,
    ctx: DistributedContext,
) -> dict[str, Any]:
    """Close the log, write ``summary.json`` and print the IoU table (main process), leave the
    process group; return the summary."""
    summary = run_summary(progress, args, class_names, stopped)
    if ctx.is_main:
        if log is not None:
            log.close()
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
        if not stopped and progress.history:
            print(final_iou_table(progress, args, class_names))
    if ctx.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary
