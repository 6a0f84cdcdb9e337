"""Pure-function forms of the losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import is_tracing

__all__ = ["IGNORE_INDEX", "consistency_loss", "pseudo_labels"]

#: Label of a pixel that no loss counts (padding, void), as in Pascal VOC's and UniMatch's masks.
IGNORE_INDEX = 255

NORMALIZATIONS = ("valid", "confident")


def pseudo_labels(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and argmax pseudo-label of detached teacher logits.

    Shape:
        - teacher_logits: ``(B, K, H, W)`` -> confidence ``(B, H, W)`` float32, labels ``(B, H, W)`` long
    """
    probs = teacher_logits.detach().float().softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    return confidence, labels


def consistency_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    confidence: torch.Tensor | None = None,
    ignore_mask: torch.Tensor | None = None,
    threshold: float = 0.95,
    ignore_index: int = IGNORE_INDEX,
    normalization: str = "valid",
) -> torch.Tensor:
    """Confidence-masked cross-entropy towards pseudo-labels.

    ``sum_p CE(logits_p, y_p) [conf_p >= threshold] [p not ignored] / Z`` with ``Z`` the number of
    not-ignored pixels (``normalization="valid"``, UniMatch) or of confident not-ignored pixels
    (``"confident"``, the reference DDFP code). No pixel to count gives 0.

    Args:
        logits: student prediction.
        target: teacher logits (softmax gives confidence and pseudo-label; no gradient flows into
            them), or hard labels with ``confidence`` given. Hard labels equal to ``ignore_index``
            are ignored; any other label outside ``[0, K)`` on a pixel that is not ignored raises
            ValueError on the CPU (on an accelerator the check is a device-side assertion, so the
            host never waits for the device).
        confidence: per-pixel confidence of hard labels.
        ignore_mask: which pixels to ignore (padding): a bool mask is True where a pixel is
            ignored; any other dtype marks ignored pixels with the value ``ignore_index``.
        threshold: minimum confidence of a counted pixel.
        ignore_index: the value marking ignored pixels.
        normalization: "valid" or "confident".

    Shape:
        - logits: ``(B, K, H, W)``
        - target: ``(B, K, H, W)`` float, or ``(B, H, W)`` long
        - confidence, ignore_mask: ``(B, H, W)``
        - returns: scalar
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a float tensor (B, K, H, W), got {shape}")
    b, _, h, w = logits.shape
    pixel_shape = (b, h, w)
    if target.is_floating_point():
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(
                f"teacher logits have shape {tuple(target.shape)}, expected {tuple(logits.shape)}"
            )
        if confidence is not None:
            raise ValueError(
                "confidence is derived from teacher logits; pass it only with hard labels"
            )
        confidence, labels = pseudo_labels(target)
        valid = torch.ones(pixel_shape, dtype=torch.bool, device=logits.device)
    else:
        if tuple(target.shape) != pixel_shape:
            raise ValueError(
                f"hard labels have shape {tuple(target.shape)}, expected {pixel_shape}"
            )
        if confidence is None:
            raise ValueError("hard labels need a confidence map (B, H, W)")
        if tuple(confidence.shape) != pixel_shape:
            raise ValueError(
                f"confidence has shape {tuple(confidence.shape)}, expected {pixel_shape}"
            )
        labels = target.long()
        valid = labels != ignore_index
        confidence = confidence.detach().float()
    if ignore_mask is not None:
        if tuple(ignore_mask.shape) != pixel_shape:
            raise ValueError(
                f"ignore_mask has shape {tuple(ignore_mask.shape)}, expected {pixel_shape}"
            )
        if ignore_mask.dtype == torch.bool:
            valid = valid & ~ignore_mask
        else:
            valid = valid & (ignore_mask != ignore_index)
    if not target.is_floating_point():
        _check_label_range(labels, valid, logits.shape[1], ignore_index)
        labels = torch.where(valid, labels, torch.zeros_like(labels))
    per_pixel = F.cross_entropy(logits.float(), labels, reduction="none")
    counted = valid & (confidence >= threshold)
    total = (per_pixel * counted).sum()
    denominator = valid.sum() if normalization == "valid" else counted.sum()
    return total / denominator.clamp_min(1)


def _check_label_range(
    labels: torch.Tensor, valid: torch.Tensor, num_classes: int, ignore_index: int
) -> None:
    """Reject a label outside ``[0, num_classes)`` on a valid pixel.

    One reduction decides; only when it fails are the bad values read. On an accelerator (and while
    tracing) it is a device-side assertion instead of a ValueError, so the host never waits.
    """
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if labels.device.type != "cpu" or is_tracing():
        if labels.device.type != "cpu" and hasattr(torch, "_assert_async"):
            torch._assert_async(
                ~bad.any(), f"hard labels outside [0, {num_classes}) and not ignore_index"
            )
        return
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"hard label {value} is neither a class in [0, {num_classes}) "
            f"nor ignore_index={ignore_index}"
        )
