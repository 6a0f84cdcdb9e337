"""OnlineFlowTrainer: sampling, the loss it reports, the step, the schedule, and state round trips."""

import math

import pytest
import torch

from ddfp_lib import FlowDensityEstimator, OnlineFlowTrainer
from ddfp_lib.training import feature_rows_and_labels


def test_labels_are_nearest_downsampled_and_ignored_pixels_flagged_invalid():
    features = torch.randn(1, 4, 2, 2)
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2], [255, 255, 2, 2]]])
    rows, row_labels, valid = feature_rows_and_labels(features, labels, num_classes=3)
    assert torch.equal(rows, features.permute(0, 2, 3, 1).reshape(4, 4))
    assert row_labels.tolist() == [0, 1, -1, 2]
    assert valid.tolist() == [True, True, False, True]


def test_missing_labels_mean_unknown_class_everywhere():
    _, row_labels, valid = feature_rows_and_labels(torch.randn(2, 4, 3, 3), None, num_classes=3)
    assert row_labels.eq(-1).all() and valid.all() and row_labels.numel() == 18


def test_labels_outside_the_classes_raise_value_error():
    with pytest.raises(ValueError, match="label 7"):
        feature_rows_and_labels(torch.randn(1, 4, 2, 2), torch.full((1, 2, 2), 7), num_classes=3)


def test_sample_draws_only_valid_rows_and_at_most_max_samples():
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, max_samples=10)
    features = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    labels = torch.full((2, 4, 4), 255)
    labels[0, :3] = 1
    rows, row_labels, weights = trainer.sample(features, labels)
    assert rows.shape == (10, 4) and weights.eq(1).all() and row_labels.eq(1).all()
    all_rows = features.permute(0, 2, 3, 1).reshape(-1, 4)
    valid_rows = all_rows[labels.reshape(-1) == 1]
    assert all((valid_rows == r).all(1).any() for r in rows)


def test_fewer_valid_rows_than_max_samples_get_zero_weight_padding():
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, max_samples=20480)
    labels = torch.full((1, 3, 3), 255)
    labels[0, 0, 0] = 2
    labels[0, 2, 2] = 0
    rows, row_labels, weights = trainer.sample(torch.randn(1, 4, 3, 3), labels)
    assert rows.shape[0] == 9 and weights.sum() == 2
    assert sorted(row_labels[weights > 0].tolist()) == [0, 2]


def test_sample_combines_labelled_and_unlabelled_batches():
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est)
    labelled, unlabelled = torch.randn(1, 4, 2, 2), torch.randn(2, 4, 2, 2)
    rows, row_labels, weights = trainer.sample(
        [labelled, unlabelled], [torch.zeros(1, 2, 2, dtype=torch.long), None]
    )
    assert rows.shape[0] == 12 and weights.sum() == 12
    assert (row_labels == 0).sum() == 4 and (row_labels == -1).sum() == 8


def test_reported_loss_is_the_weighted_nll_before_the_step():
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, noise_std=0.0)
    features = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 3, (2, 3, 3))
    expected = est.nll(features.permute(0, 2, 3, 1).reshape(-1, 4), labels.reshape(-1)).item()
    loss = trainer.step(features, labels)
    assert loss.dim() == 0 and not loss.requires_grad
    assert abs(loss.item() - expected) < 1e-5
    assert (
        est.nll(features.permute(0, 2, 3, 1).reshape(-1, 4), labels.reshape(-1)).item() < expected
    )


def test_repeated_steps_lower_the_nll_of_the_features():
    torch.manual_seed(0)
    est = FlowDensityEstimator(8, 2, hidden_dim=32, seed=0)
    trainer = OnlineFlowTrainer(est, lr=3e-3)
    features = 3 * torch.randn(4, 8, 6, 6) + 1.0
    before = est.nll(features).item()
    for _ in range(60):
        trainer.step(features)
    assert est.nll(features).item() < before - 1.0


def test_learning_rate_decays_exponentially_to_the_final_factor():
    est = FlowDensityEstimator(4, 2, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, lr=1e-3, total_steps=10, final_lr_factor=0.01)
    lrs = []
    for _ in range(12):
        lrs.append(float(trainer.lr))
        trainer.step(torch.randn(1, 4, 2, 2))
    assert math.isclose(lrs[0], 1e-3, rel_tol=1e-6)
    assert math.isclose(lrs[5], 1e-3 * 0.01**0.5, rel_tol=1e-6)
    assert math.isclose(lrs[10], 1e-5, rel_tol=1e-6) and math.isclose(lrs[11], 1e-5, rel_tol=1e-6)


def plain_adam_reference(batches, total_steps, lr=1e-3):
    """The flow trained by torch's Adam with the learning rate set by hand before each step."""
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0)
    optimizer = torch.optim.Adam(est.parameters(), lr=lr, betas=(0.5, 0.9))
    for step, (features, labels) in enumerate(batches):
        rows = features.permute(0, 2, 3, 1).reshape(-1, 4)
        loss = est.nll(rows, labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(est.parameters(), 50.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.01 ** min(step / total_steps, 1.0)
        optimizer.step()
    return est


def labelled_batches(count):
    g = torch.Generator().manual_seed(4)
    return [
        (torch.randn(2, 4, 3, 3, generator=g), torch.randint(0, 3, (2, 3, 3), generator=g))
        for _ in range(count)
    ]


def test_steps_follow_adam_with_the_scheduled_learning_rate():
    batches = labelled_batches(4)
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, noise_std=0.0, total_steps=3)
    for batch in batches:
        trainer.step(*batch)
    reference = plain_adam_reference(batches, total_steps=3)
    for p, q in zip(est.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
    assert int(trainer.steps_taken) == 4


def test_a_batch_without_valid_pixels_changes_neither_the_flow_nor_the_adam_state():
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, total_steps=10)
    for batch in labelled_batches(2):
        trainer.step(*batch)
    params = [p.detach().clone() for p in est.parameters()]
    state = {
        i: {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
        for i, p in enumerate(est.parameters())
    }
    assert all(s["exp_avg"].abs().sum() > 0 for s in state.values())
    loss = trainer.step(torch.randn(2, 4, 3, 3), torch.full((2, 3, 3), 255))
    assert loss.item() == 0.0
    for i, p in enumerate(est.parameters()):
        assert torch.equal(p, params[i])
        for key, value in trainer.optimizer.state[p].items():
            assert torch.equal(value, state[i][key]), key
    assert int(trainer.steps_taken) == 2 and trainer.num_steps == 3


def test_skipped_steps_do_not_advance_the_schedule():
    batches = labelled_batches(3)
    empty = (torch.randn(1, 4, 3, 3), torch.full((1, 3, 3), 255))
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, noise_std=0.0, total_steps=3)
    for batch in [empty, batches[0], empty, empty, batches[1], batches[2]]:
        trainer.step(*batch)
    reference = plain_adam_reference(batches, total_steps=3)
    for p, q in zip(est.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
    assert math.isclose(float(trainer.lr), 1e-5, rel_tol=1e-6)


def test_gradients_are_clipped_to_the_given_total_norm():
    est = FlowDensityEstimator(4, 2, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, grad_clip=1e-3)
    trainer.step(100 * torch.randn(2, 4, 3, 3))
    total = torch.sqrt(sum((p.grad**2).sum() for p in est.parameters()))
    assert total <= 1e-3 * (1 + 1e-4)


def test_step_under_bf16_autocast_runs_in_float32():
    est = FlowDensityEstimator(4, 2, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.step(torch.randn(2, 4, 3, 3).bfloat16())
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in est.parameters())


def test_trainer_state_round_trip_continues_identically():
    def make():
        est = FlowDensityEstimator(4, 2, hidden_dim=8, seed=0)
        return est, OnlineFlowTrainer(est, total_steps=20, noise_std=0.0)

    data = [torch.randn(1, 4, 3, 3) for _ in range(4)]
    est_a, trainer_a = make()
    for x in data:
        trainer_a.step(x)
    est_b, trainer_b = make()
    for x in data[:2]:
        trainer_b.step(x)
    est_c, trainer_c = make()
    est_c.load_state_dict(est_b.state_dict())
    trainer_c.load_state_dict(trainer_b.state_dict())
    for x in data[2:]:
        trainer_c.step(x)
    assert trainer_c.num_steps == 4 and int(trainer_c.steps_taken) == 4
    for p, q in zip(est_a.parameters(), est_c.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


def test_trainer_state_saved_with_a_scheduler_entry_still_loads():
    est = FlowDensityEstimator(4, 2, hidden_dim=8, seed=0)
    trainer = OnlineFlowTrainer(est, total_steps=20)
    trainer.step(torch.randn(1, 4, 3, 3))
    older = trainer.state_dict()
    del older["steps_taken"]
    older["optimizer"]["param_groups"][0]["lr"] = 5e-4
    older["scheduler"] = {"last_epoch": 1}
    restored = OnlineFlowTrainer(FlowDensityEstimator(4, 2, hidden_dim=8, seed=0), total_steps=20)
    restored.load_state_dict(older)
    assert int(restored.steps_taken) == 1 and restored.num_steps == 1
    assert restored.optimizer.param_groups[0]["lr"] == 1e-3
    assert math.isclose(float(restored.lr), float(trainer.lr), rel_tol=1e-6)


def test_bad_trainer_arguments_raise_value_error():
    est = FlowDensityEstimator(4, 2, hidden_dim=8, seed=0)
    with pytest.raises(ValueError, match="lr"):
        OnlineFlowTrainer(est, lr=0)
    with pytest.raises(ValueError, match="max_samples"):
        OnlineFlowTrainer(est, max_samples=0)
    with pytest.raises(ValueError, match="FlowDensityEstimator"):
        OnlineFlowTrainer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="channels"):
        OnlineFlowTrainer(est).step(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match="sync_gradients=True"):
        OnlineFlowTrainer(est, sync_gradients=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist only on CUDA")
def test_steps_and_skipped_steps_have_no_host_device_synchronisation_on_cuda():
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0).cuda()
    trainer = OnlineFlowTrainer(est, total_steps=10)
    features = torch.randn(2, 4, 3, 3, device="cuda")
    labels = torch.randint(0, 3, (2, 3, 3), device="cuda")
    trainer.step(features, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(features, labels)
        params = [p.detach().clone() for p in est.parameters()]
        trainer.step(features, torch.full_like(labels, 255))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(p, q) for p, q in zip(est.parameters(), params))
    assert int(trainer.steps_taken) == 2


def test_float64_estimator_trains_in_float64_and_reports_its_exact_nll():
    est = FlowDensityEstimator(4, 3, hidden_dim=8, seed=0).double()
    trainer = OnlineFlowTrainer(est, noise_std=0.0)
    features = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 3, 3))
    rows = features.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = est.nll(rows, labels.reshape(-1))
    loss = trainer.step(features, labels)
    assert loss.dtype == torch.float64 and abs(loss.item() - expected.item()) < 1e-12
    assert all(p.dtype == torch.float64 for p in est.parameters())
    assert est.nll(rows, labels.reshape(-1)).item() < expected.item()
