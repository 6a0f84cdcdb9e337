"""OnlineFlowTrainer under two gloo processes: identical flows, equal to averaging per-rank gradients."""

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ddfp_lib import FlowDensityEstimator, OnlineFlowTrainer
from ddfp_lib.training import feature_rows_and_labels

WORLD_SIZE = 2
STEPS = 3
TIMEOUT_S = 120


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data per rank and step, with a different number of rows on each rank."""
    generator = torch.Generator().manual_seed(100 * rank + step)
    size = (3, 4) if rank == 0 else (5, 5)
    features = torch.randn(1 + rank, 4, *size, generator=generator) + rank
    labels = torch.randint(-1, 2, (1 + rank, *size), generator=generator)
    return features, labels


def make_estimator(seed: int) -> FlowDensityEstimator:
    return FlowDensityEstimator(4, 2, hidden_dim=8, seed=seed)


def make_trainer(estimator: FlowDensityEstimator) -> OnlineFlowTrainer:
    return OnlineFlowTrainer(estimator, noise_std=0.0, max_samples=1000, total_steps=10)


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.manual_seed(rank)
        estimator = make_estimator(seed=10 + rank)
        trainer = make_trainer(estimator)
        initial = {k: v.clone() for k, v in estimator.state_dict().items()}
        for step in range(STEPS):
            trainer.step(*rank_batch(rank, step))
        final = {k: v.clone() for k, v in estimator.state_dict().items()}
        # Rank 0 has no valid pixel this time; rank 1 has: both ranks must still step together.
        features, labels = rank_batch(rank, STEPS)
        trainer.step(features, torch.full_like(labels, 255) if rank == 0 else labels)
        torch.save(
            {
                "initial": initial,
                "final": final,
                "one_rank_empty": estimator.state_dict(),
                "steps_taken": int(trainer.steps_taken),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(out_dir: str) -> None:
    context = mp.start_processes(
        worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"the two gloo ranks did not finish within {TIMEOUT_S} s")


def rank_gradient(estimator: FlowDensityEstimator, features, labels) -> list[torch.Tensor]:
    rows, row_labels, _ = feature_rows_and_labels(features, labels, estimator.num_classes)
    loss = -estimator.log_prob_rows(rows, row_labels).mean()
    return torch.autograd.grad(loss, list(estimator.parameters()))


def single_process_reference(pooled: bool = False) -> dict[str, torch.Tensor]:
    """The same steps in one process, each taking the average of the two per-rank mean-loss
    gradients, or (``pooled``) the gradient of one mean over the rows of both ranks."""
    estimator = make_estimator(seed=10)
    trainer = make_trainer(estimator)
    for step in range(STEPS):
        batches = [rank_batch(rank, step) for rank in range(WORLD_SIZE)]
        if pooled:
            rows = [feature_rows_and_labels(f, y, estimator.num_classes)[:2] for f, y in batches]
            features = torch.cat([r for r, _ in rows])[:, :, None, None]
            labels = torch.cat([y for _, y in rows])[:, None, None]
            batches = [(features, labels)] * WORLD_SIZE
        per_rank = [rank_gradient(estimator, *batch) for batch in batches]
        for p, *grads in zip(estimator.parameters(), *per_rank):
            p.grad = sum(grads) / WORLD_SIZE
        nn.utils.clip_grad_norm_(estimator.parameters(), trainer.grad_clip)
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e-3 * 0.01 ** (step / 10)
        trainer.optimizer.step()
    return estimator.state_dict()


@pytest.mark.slow
def test_two_gloo_ranks_keep_identical_flows_equal_to_averaged_per_rank_gradients(tmp_path):
    run_two_ranks(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    rank0_init = make_estimator(seed=10).state_dict()
    rank1_own_init = make_estimator(seed=11).state_dict()
    assert any(not torch.equal(rank0_init[k], rank1_own_init[k]) for k in rank0_init)
    for k, value in rank0_init.items():
        assert torch.equal(ranks[1]["initial"][k], value), f"rank 1 did not receive rank 0's {k}"
    for k, value in ranks[0]["final"].items():
        assert torch.equal(ranks[1]["final"][k], value), f"ranks differ in {k}"
    reference = single_process_reference()
    changed = False
    for k, value in reference.items():
        assert torch.allclose(ranks[0]["final"][k], value, atol=1e-6, rtol=1e-5), k
        changed |= not torch.equal(value, rank0_init[k])
    assert changed
    for k, value in ranks[0]["one_rank_empty"].items():
        assert torch.equal(ranks[1]["one_rank_empty"][k], value), f"ranks differ in {k}"
    assert any(
        not torch.equal(ranks[0]["one_rank_empty"][k], ranks[0]["final"][k])
        for k in ranks[0]["final"]
    ), "a step with valid pixels on one rank must be taken by every rank"
    assert ranks[0]["steps_taken"] == ranks[1]["steps_taken"] == STEPS + 1
    pooled = single_process_reference(pooled=True)
    assert any(
        not torch.allclose(ranks[0]["final"][k], value, atol=1e-6, rtol=1e-5)
        for k, value in pooled.items()
    ), "the test cannot tell per-rank averaging from one pooled mean"
