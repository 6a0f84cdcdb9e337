"""ConsistencyLoss against a pixel-by-pixel hand computation."""

import math

import pytest
import torch

from ddfp_lib import ConsistencyLoss, consistency_loss


def hand_loss(logits, teacher, ignore, threshold, normalization):
    b, k, h, w = logits.shape
    total, valid, counted = 0.0, 0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if ignore is not None and int(ignore[i, y, x]) == 255:
                    continue
                valid += 1
                probs = [math.exp(float(teacher[i, c, y, x])) for c in range(k)]
                conf = max(probs) / sum(probs)
                label = probs.index(max(probs))
                if conf < threshold:
                    continue
                counted += 1
                log_z = math.log(sum(math.exp(float(logits[i, c, y, x])) for c in range(k)))
                total += log_z - float(logits[i, label, y, x])
    denom = valid if normalization == "valid" else counted
    return total / max(denom, 1)


@pytest.mark.parametrize("normalization", ["valid", "confident"])
def test_loss_equals_hand_computation_for_both_normalisations(normalization):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    teacher = 3 * torch.randn(2, 4, 3, 5, generator=g)
    ignore = torch.where(torch.rand(2, 3, 5, generator=g) > 0.8, 255, 0)
    got = ConsistencyLoss(threshold=0.7, normalization=normalization)(
        logits, teacher, ignore_mask=ignore
    )
    expected = hand_loss(logits, teacher, ignore, 0.7, normalization)
    assert abs(got.item() - expected) < 1e-5


def test_hard_labels_with_confidence_equal_the_teacher_logits_path():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    teacher = 2 * torch.randn(2, 3, 4, 4, generator=g)
    conf, labels = teacher.softmax(1).max(1)
    loss = ConsistencyLoss(threshold=0.6)
    assert torch.allclose(loss(logits, teacher), loss(logits, labels, confidence=conf), atol=1e-6)


def test_hard_labels_equal_to_ignore_index_are_ignored():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 255], [1, 2]]])
    conf = torch.ones(1, 2, 2)
    got = consistency_loss(logits, labels, confidence=conf, threshold=0.5)
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
    assert torch.allclose(got, ce / 3)


def test_no_gradient_reaches_the_teacher_logits():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 2, requires_grad=True)
    ConsistencyLoss(threshold=0.0)(logits, teacher).backward()
    assert teacher.grad is None and logits.grad is not None


@pytest.mark.parametrize("normalization", ["valid", "confident"])
def test_no_valid_pixel_gives_zero_and_a_finite_gradient(normalization):
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 2)
    all_ignored = torch.full((1, 2, 2), 255)
    loss = ConsistencyLoss(normalization=normalization)(logits, teacher, ignore_mask=all_ignored)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    nothing_confident = ConsistencyLoss(threshold=1.0, normalization=normalization)(
        logits, torch.zeros(1, 3, 2, 2)
    )
    assert nothing_confident.item() == 0.0


@pytest.mark.parametrize(
    "args,match",
    [
        (
            (torch.randn(3, 2, 2), torch.randn(3, 2, 2)),
            r"logits must be a float tensor \(B, K, H, W\)",
        ),
        ((torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2)), "teacher logits have shape"),
        (
            (torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long)),
            "hard labels have shape",
        ),
        ((torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)), "need a confidence"),
    ],
)
def test_bad_shapes_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyLoss()(*args)


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="normalization"):
        ConsistencyLoss(normalization="mean")
    with pytest.raises(ValueError, match="threshold"):
        ConsistencyLoss(threshold=1.5)
    with pytest.raises(ValueError, match="ignore_mask has shape"):
        ConsistencyLoss()(
            torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), ignore_mask=torch.zeros(1, 3, 3)
        )


def test_bool_ignore_mask_true_means_ignored():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    teacher = 3 * torch.randn(2, 4, 3, 5, generator=g)
    ignored = torch.rand(2, 3, 5, generator=g) > 0.6
    assert ignored.any() and not ignored.all()
    loss = ConsistencyLoss(threshold=0.0)
    got = loss(logits, teacher, ignore_mask=ignored)
    expected = hand_loss(logits, teacher, torch.where(ignored, 255, 0), 0.0, "valid")
    assert abs(got.item() - expected) < 1e-5
    as_index = loss(logits, teacher, ignore_mask=torch.where(ignored, 255, 0))
    assert torch.allclose(got, as_index)
    # Nothing ignored would give a different value: the mask is not dropped.
    assert abs(loss(logits, teacher).item() - expected) > 1e-3


def test_bool_ignore_mask_applies_to_hard_labels_too():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 1]]])
    ignored = torch.tensor([[[False, True], [False, False]]])
    got = consistency_loss(logits, labels, torch.ones(1, 2, 2), ignore_mask=ignored, threshold=0.5)
    kept = torch.where(ignored, 255, labels)
    ce = torch.nn.functional.cross_entropy(logits, kept, ignore_index=255, reduction="sum")
    assert torch.allclose(got, ce / 3)


@pytest.mark.parametrize("bad", [3, 7, -1, -5])
def test_hard_labels_outside_the_classes_raise_value_error_naming_the_value(bad):
    labels = torch.tensor([[[0, 1], [2, bad]]])
    with pytest.raises(ValueError, match=f"label {bad}"):
        consistency_loss(torch.randn(1, 3, 2, 2), labels, confidence=torch.ones(1, 2, 2))


def test_labels_of_ignored_pixels_are_not_checked_nor_counted():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 9]]])
    ignored = torch.tensor([[[False, False], [False, True]]])
    got = consistency_loss(logits, labels, torch.ones(1, 2, 2), ignore_mask=ignored)
    kept = torch.tensor([[[0, 1], [2, 255]]])
    ce = torch.nn.functional.cross_entropy(logits, kept, ignore_index=255, reduction="sum")
    assert torch.allclose(got, ce / 3)
