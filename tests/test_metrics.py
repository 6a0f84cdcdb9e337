"""The example loop's evaluation: IoU, foreground scores and sliding windows against direct counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ddfp_examples.metrics import IoUMeter, format_iou_table, sliding_window_logits
from torch import nn


def _random_maps(seed: int, k: int = 5, shape=(3, 7, 9)):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < 0.1] = 255
    prediction = torch.randint(0, k, shape, generator=generator)
    return prediction, target


def test_iou_and_foreground_scores_equal_direct_pixel_counts():
    k = 5
    meter = IoUMeter(k)
    batches = [_random_maps(seed, k) for seed in range(3)]
    for prediction, target in batches:
        meter.update(prediction, target)
    pred = np.concatenate([p.numpy().ravel() for p, _ in batches])
    true = np.concatenate([t.numpy().ravel() for _, t in batches])
    pred, true = pred[true != 255], true[true != 255]
    for c in range(k):
        inter = np.sum((pred == c) & (true == c))
        union = np.sum((pred == c) | (true == c))
        assert meter.per_class_iou()[c].item() == pytest.approx(inter / union)
    fg_pred, fg_true = pred != 0, true != 0
    assert meter.foreground_iou(0) == pytest.approx(
        np.sum(fg_pred & fg_true) / np.sum(fg_pred | fg_true)
    )
    assert meter.foreground_accuracy(0) == pytest.approx(np.mean(pred[fg_true] == true[fg_true]))
    assert meter.miou() == pytest.approx(float(np.mean(meter.per_class_iou().numpy())))


def test_absent_class_is_nan_and_left_out_of_the_mean():
    meter = IoUMeter(3)
    meter.update(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 1, 0]]]))
    iou = meter.per_class_iou()
    assert math.isnan(iou[2].item())
    assert meter.miou() == pytest.approx((0.5 + 0.5) / 2)
    assert math.isnan(IoUMeter(3).foreground_accuracy(0))


def test_table_from_meter_and_from_stored_values_agree_and_show_extra_scores():
    meter = IoUMeter(3)
    meter.update(torch.tensor([[[0, 1, 1, 2]]]), torch.tensor([[[0, 1, 0, 2]]]))
    names = ("background", "a", "b")
    extra = {"foreground IoU": meter.foreground_iou(0)}
    from_meter = format_iou_table(meter, names, title="t", extra=extra)
    from_values = format_iou_table(meter.per_class_iou().tolist(), names, title="t", extra=extra)
    assert from_meter == from_values
    assert "foreground IoU" in from_meter and "66.67" in from_meter
    with pytest.raises(ValueError, match="3 class names"):
        format_iou_table([0.5, None], names)


def test_sliding_window_of_a_pointwise_model_equals_the_full_image():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    image = torch.randn(2, 3, 23, 31)
    with torch.no_grad():
        windows = sliding_window_logits(model, image, 4, window=10, stride=6)
        full = model(image)
    torch.testing.assert_close(windows, full, rtol=1e-5, atol=1e-6)
