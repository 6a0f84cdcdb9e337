"""The example loop's evaluation: IoU, foreground scores and sliding windows against direct counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ddfp_examples.metrics import (
    IoUMeter,
    evaluate,
    format_iou_table,
    multi_scale_probabilities,
    sliding_window_logits,
)
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


class _LeftToRight(torch.nn.Module):
    """Class scores that depend on the column and on the image: not mirror-symmetric, not
    scale-free, so flipping and rescaling change what it predicts."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        columns = torch.linspace(-1.0, 1.0, x.shape[-1]).expand(x.shape[0], 1, *x.shape[-2:])
        return self.conv(x) + torch.cat([columns, -columns, columns**2, 0 * columns], dim=1)


def test_multi_scale_flip_probabilities_average_every_copy_resized_back():
    torch.manual_seed(0)
    model = _LeftToRight().eval()
    image = torch.randn(2, 3, 12, 17)
    got = multi_scale_probabilities(model, image, scales=(0.5, 1.0, 1.5), flip=True)
    # A second computation, one copy at a time, with the sizes written out.
    copies = []
    for size in [(6, 8), (12, 17), (18, 26)]:
        scaled = torch.nn.functional.interpolate(image, size=size, mode="bilinear")
        for mirrored in (False, True):
            logits = model(scaled.flip(-1)).flip(-1) if mirrored else model(scaled)
            back = torch.nn.functional.interpolate(logits, size=(12, 17), mode="bilinear")
            copies.append(back.softmax(dim=1))
    expected = torch.stack(copies).mean(dim=0)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, model(image).softmax(dim=1), atol=1e-3)


def test_evaluate_with_one_scale_and_no_flip_is_the_plain_prediction_and_flip_changes_it():
    torch.manual_seed(0)
    model = _LeftToRight()
    images = torch.randn(3, 3, 10, 14)
    masks = torch.randint(0, 4, (3, 10, 14))
    loader = [(images[i : i + 1], masks[i : i + 1], None) for i in range(3)]
    plain = evaluate(model, loader, 4, torch.device("cpu"))
    explicit = evaluate(model, loader, 4, torch.device("cpu"), scales=(1.0,), flip=False)
    assert torch.equal(plain.confusion, explicit.confusion)
    direct = IoUMeter(4)
    for image, mask, _ in loader:
        direct.update(model(image).argmax(dim=1), mask)
    assert torch.equal(plain.confusion, direct.confusion)
    flipped = evaluate(model, loader, 4, torch.device("cpu"), flip=True)
    by_hand = IoUMeter(4)
    for image, mask, _ in loader:
        probabilities = model(image).softmax(1) + model(image.flip(-1)).flip(-1).softmax(1)
        by_hand.update(probabilities.argmax(dim=1), mask)
    assert torch.equal(flipped.confusion, by_hand.confusion)
    assert not torch.equal(flipped.confusion, plain.confusion)
    with pytest.raises(ValueError, match="scales must be positive"):
        evaluate(model, loader, 4, torch.device("cpu"), scales=(0.0,))
