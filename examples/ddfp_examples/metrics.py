"""Evaluation: confusion-based IoU; full-image, sliding-window and multi-scale + flip inference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

__all__ = [
    "IoUMeter",
    "evaluate",
    "format_iou_table",
    "multi_scale_probabilities",
    "sliding_window_logits",
]


class IoUMeter:
    """Accumulates a confusion matrix over predictions; ``ignore_index`` pixels are skipped.

    ``confusion[t, p]`` counts pixels of true class ``t`` predicted as ``p``; per-class IoU, mIoU and
    the foreground scores are read from it. The counts are int64 on ``device`` (exact, and
    available on every device: MPS has no float64); the scores are computed in float64 on the CPU.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | None = None
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @property
    def confusion(self) -> torch.Tensor:
        """The confusion matrix ``(K, K)`` in float64 on the CPU."""
        return self.counts.cpu().double()

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """prediction, target: ``(B, H, W)`` long."""
        valid = target != self.ignore_index
        pred = prediction[valid]
        true = target[valid]
        k = self.num_classes
        counts = torch.bincount(true * k + pred, minlength=k * k).reshape(k, k)
        self.counts += counts.to(self.counts)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    @property
    def intersection(self) -> torch.Tensor:
        """Per class: pixels of the class predicted as the class."""
        return self.confusion.diag()

    @property
    def union(self) -> torch.Tensor:
        """Per class: pixels of the class or predicted as it."""
        return self.confusion.sum(0) + self.confusion.sum(1) - self.confusion.diag()

    def per_class_iou(self) -> torch.Tensor:
        """IoU per class in [0, 1]; NaN for a class absent from both prediction and target."""
        confusion = self.confusion
        intersection = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp_min(1), float("nan"))

    def miou(self) -> float:
        return _mean_of_present(self.per_class_iou().tolist())

    def foreground_iou(self, background: int = 0) -> float:
        """IoU of "any class but ``background``" as one class: are the objects found at all?"""
        confusion = self.confusion
        total = confusion.sum()
        both = total - confusion[background].sum() - confusion[:, background].sum()
        both += confusion[background, background]
        union = total - confusion[background, background]
        return float(both / union) if union > 0 else float("nan")

    def foreground_accuracy(self, background: int = 0) -> float:
        """Share of the non-``background`` pixels predicted as their own class: are they named right?"""
        confusion = self.confusion
        foreground = torch.ones(self.num_classes, dtype=torch.bool)
        foreground[background] = False
        pixels = confusion[foreground].sum()
        correct = confusion.diag()[foreground].sum()
        return float(correct / pixels) if pixels > 0 else float("nan")


def _mean_of_present(iou: Sequence[float]) -> float:
    """Mean over the classes whose IoU is not NaN (absent classes); NaN if none is present."""
    present = [value for value in iou if not math.isnan(value)]
    return sum(present) / len(present) if present else float("nan")


def sliding_window_logits(
    model: nn.Module, image: torch.Tensor, num_classes: int, window: int, stride: int
) -> torch.Tensor:
    """Average of the logits of crop-sized windows on a regular grid covering ``image (B, 3, H, W)``."""
    b, _, h, w = image.shape
    logits = image.new_zeros(b, num_classes, h, w)
    counts = image.new_zeros(1, 1, h, w)
    rows = max(1, math.ceil((h - window) / stride) + 1)
    cols = max(1, math.ceil((w - window) / stride) + 1)
    for i in range(rows):
        for j in range(cols):
            top = min(i * stride, max(h - window, 0))
            left = min(j * stride, max(w - window, 0))
            crop = image[:, :, top : top + window, left : left + window]
            logits[:, :, top : top + crop.shape[2], left : left + crop.shape[3]] += model(
                crop
            ).float()
            counts[:, :, top : top + crop.shape[2], left : left + crop.shape[3]] += 1
    return logits / counts


def multi_scale_probabilities(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities averaged over rescaled (and mirrored) copies of ``image``.

    Each copy is resized by a scale (bilinear), predicted, its logits resized back to the image's
    size and turned into probabilities; with ``flip`` every scale also sees the mirrored image,
    whose prediction is mirrored back. The mean over the copies is returned.

    Shape:
        - image: ``(B, 3, H, W)`` -> ``(B, K, H, W)`` float32
    """
    size = image.shape[-2:]
    total: torch.Tensor | None = None
    copies = 0
    for scale in scales:
        scaled = image
        if scale != 1.0:
            scaled_size = [max(1, round(side * scale)) for side in size]
            scaled = F.interpolate(image, size=scaled_size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            logits = predict(scaled.flip(-1) if mirrored else scaled).float()
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probabilities = logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
            copies += 1
    if total is None:
        raise ValueError("scales must hold at least one scale")
    return total / copies


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    mode: str = "full",
    window: int = 0,
    amp_dtype: torch.dtype | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> IoUMeter:
    """mIoU of ``model`` on ``loader`` (images at their own size), reduced over ranks.

    ``mode="sliding"`` evaluates crop-sized windows with a stride of 2/3 of the window.
    ``scales`` and ``flip`` add multi-scale and mirrored copies, their probabilities averaged
    (:func:`multi_scale_probabilities`); the default is the single plain prediction.
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive, got {list(scales)}")
    was_training = model.training
    model.eval()
    meter = IoUMeter(num_classes, device=device)

    def predict(image: torch.Tensor) -> torch.Tensor:
        if mode == "sliding":
            return sliding_window_logits(model, image, num_classes, window, window * 2 // 3)
        return model(image)

    plain = tuple(scales) == (1.0,) and not flip
    for image, mask, _ in loader:
        image, mask = image.to(device), mask.to(device)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            if plain:
                scores = predict(image)
            else:
                scores = multi_scale_probabilities(predict, image, scales, flip)
        meter.update(scores.argmax(dim=1), mask)
    meter.all_reduce()
    model.train(was_training)
    return meter


def format_iou_table(
    meter: IoUMeter | Sequence[float | None] | torch.Tensor,
    class_names: Sequence[str],
    title: str = "",
    extra: dict[str, float] | None = None,
) -> str:
    """A plain-text table of per-class IoU (%) and the mIoU, then any ``extra`` scores (in [0, 1]).

    ``meter`` is an :class:`IoUMeter` or the per-class IoUs themselves (None / NaN = absent class).
    """
    if isinstance(meter, IoUMeter):
        iou = meter.per_class_iou().tolist()
    else:
        values = meter.tolist() if isinstance(meter, torch.Tensor) else list(meter)
        iou = [float("nan") if v is None else float(v) for v in values]
    if len(iou) != len(class_names):
        raise ValueError(f"{len(iou)} IoU values for {len(class_names)} class names")
    miou = _mean_of_present(iou)
    width = max(10, max(len(n) for n in class_names) + 2, *(len(k) + 2 for k in extra or {}))
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}{'IoU (%)':>9}")
    lines.append("-" * (width + 9))
    for name, value in zip(class_names, iou):
        shown = "n/a" if math.isnan(value) else f"{100 * value:.2f}"
        lines.append(f"{name:<{width}}{shown:>9}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}{100 * miou:>9.2f}")
    for name, value in (extra or {}).items():
        shown = "n/a" if math.isnan(value) else f"{100 * value:.2f}"
        lines.append(f"{name:<{width}}{shown:>9}")
    return "\n".join(lines)
