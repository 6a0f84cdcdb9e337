"""CUDA against the CPU: the same numbers on both, and the device settings of the loop.

Every test here needs a CUDA device and is skipped without one; ``benchmarks/gpu_check.sh`` runs
them (``pytest -m cuda``) together with the synchronisation test of ``tests/test_ddfp.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ddfp_examples.metrics import IoUMeter
from ddfp_examples.runtime import pin_memory, select_device
from torch import nn

from ddfp_lib import DensityDescendingPerturbation, FlowDensityEstimator, OnlineFlowTrainer
from ddfp_lib.perturbations.ddfp import AUTO_CHUNK_ROWS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def full_float32(monkeypatch):
    """No TF32 in convolutions or matmuls: the comparisons with the CPU are float32 against float32."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    yield
    torch.set_float32_matmul_precision(precision)


def far_from_identity(est: FlowDensityEstimator) -> FlowDensityEstimator:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in est.named_parameters():
            if name.endswith(("4.weight", "4.bias")):  # the zero-initialised last subnet layers
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return est


def test_log_prob_on_cuda_matches_the_cpu_in_float32_bf16_autocast_and_float64():
    est = far_from_identity(FlowDensityEstimator(32, 5, hidden_dim=64, seed=0))
    x = torch.randn(4096, 32) + 1.0
    labels = torch.randint(-1, 5, (4096,))
    on_cpu = est.log_prob(x, labels)
    gpu = copy.deepcopy(est).cuda()
    assert torch.allclose(gpu.log_prob(x.cuda(), labels.cuda()).cpu(), on_cpu, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        under_autocast = gpu.log_prob(x.cuda(), labels.cuda())
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast.cpu(), on_cpu, atol=1e-3)
    double = gpu.double().log_prob(x.cuda().double(), labels.cuda())
    assert double.dtype == torch.float64
    assert (double.cpu() - est.double().log_prob(x.double(), labels)).abs().max() < 1e-9


def test_ddfp_on_cuda_matches_the_cpu_step_with_a_head():
    est = far_from_identity(FlowDensityEstimator(16, 3, hidden_dim=32, seed=1))
    head = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    features = torch.randn(2, 24, 17, 17)
    mask = torch.rand(2, 17, 17) > 0.3
    on_cpu = DensityDescendingPerturbation(est, eps=4.0)(features, head=head, mask=mask)
    gpu = DensityDescendingPerturbation(copy.deepcopy(est).cuda(), eps=4.0)
    on_gpu = gpu(features.cuda(), head=copy.deepcopy(head).cuda(), mask=mask.cuda())
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = gpu(features.cuda().bfloat16(), head=copy.deepcopy(head).cuda(), mask=mask.cuda())
    assert half.dtype == torch.bfloat16
    step = (half.float() - features.cuda()).norm(dim=1)
    assert torch.allclose(step[mask.cuda()], torch.full_like(step[mask.cuda()], 4.0), rtol=0.05)


def mask_of_density(n: int, density: float, device: str) -> torch.Tensor:
    """A bool mask of ``n`` rows with exactly ``round(density * n)`` True entries."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: round(density * n)]] = True
    return mask.to(device)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_default_step_on_cuda_is_sync_free_and_equals_the_dense_step(density):
    est = far_from_identity(FlowDensityEstimator(16, 3, hidden_dim=32, seed=3)).cuda()
    rows = torch.randn(2 * AUTO_CHUNK_ROWS + 5, 16, device="cuda")
    mask = mask_of_density(rows.shape[0], density, "cuda")
    default = DensityDescendingPerturbation(est, eps=4.0)
    expected = DensityDescendingPerturbation(est, eps=4.0, chunk_rows=None)(rows, mask=mask) - rows
    default(rows, mask=mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        delta = default(rows, mask=mask) - rows
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(delta).all()
    if density == 0.0:
        assert torch.equal(delta, torch.zeros_like(delta))
        return
    cosine = torch.cosine_similarity(delta.flatten().double(), expected.flatten().double(), dim=0)
    assert cosine > 0.9999
    torch.testing.assert_close(delta.norm(dim=1), expected.norm(dim=1), rtol=0, atol=1e-5)


def test_default_step_memory_on_cuda_is_bounded_by_the_chunk_not_by_the_row_count():
    est = FlowDensityEstimator(8, 3, hidden_dim=128, seed=0).cuda()
    small, large = 32768, 131072
    growth = {}
    for chunk_rows in ("auto", None):
        ddfp = DensityDescendingPerturbation(est, eps=4.0, chunk_rows=chunk_rows)
        peaks = []
        for n in (small, large):
            rows = torch.randn(n, 8, device="cuda")
            mask = mask_of_density(n, 0.5, "cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            ddfp(rows, mask=mask)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        growth[chunk_rows] = peaks[1] - peaks[0]
    # What must grow with N: the row-sized inputs and outputs of the step, a few (N, 8) tensors.
    row_sized = 16 * (large - small) * 8 * 4
    assert growth["auto"] < row_sized
    assert growth[None] > 4 * row_sized, "the measure must see the flow's graph of every row"


def test_online_flow_step_on_cuda_matches_the_cpu_step():
    features = torch.randn(2, 8, 6, 6)
    labels = torch.randint(0, 3, (2, 24, 24))
    trained = []
    for device in ("cpu", "cuda"):
        est = far_from_identity(FlowDensityEstimator(8, 3, hidden_dim=16, seed=2)).to(device)
        # Every row is drawn (max_samples above the row count) and no noise: nothing random.
        trainer = OnlineFlowTrainer(est, noise_std=0.0, max_samples=10_000)
        loss = trainer.step(features.to(device), labels.to(device))
        # Gradients, not the stepped weights: Adam's first step is lr * sign(g) wherever g is not
        # tiny, so a rounding difference of a tiny g would move a weight by a whole lr.
        trained.append((loss.cpu(), [p.grad.cpu() for p in est.parameters()]))
    (loss_cpu, grads_cpu), (loss_gpu, grads_gpu) = trained
    assert torch.allclose(loss_gpu, loss_cpu, atol=1e-3)
    assert any(g.abs().max() > 1e-3 for g in grads_cpu)
    for g_cpu, g_gpu in zip(grads_cpu, grads_gpu):
        assert torch.allclose(g_gpu, g_cpu, atol=1e-4, rtol=1e-4)


def test_iou_counts_on_cuda_equal_the_cpu_counts():
    prediction = torch.randint(0, 4, (3, 40, 50))
    target = torch.randint(0, 4, (3, 40, 50))
    target[:, :5] = 255
    meters = {}
    for device in ("cpu", "cuda"):
        meters[device] = IoUMeter(4, device=torch.device(device))
        meters[device].update(prediction.to(device), target.to(device))
    assert torch.equal(meters["cuda"].confusion, meters["cpu"].confusion)
    assert meters["cuda"].miou() == meters["cpu"].miou()


def test_auto_device_is_cuda_and_its_loaders_pin_memory():
    device = select_device("auto")
    assert device.type == "cuda" and pin_memory(device)
