"""Device choice and device-specific settings of the example loop, checked on the CPU.

No CUDA or MPS device ran these: their availability is monkeypatched, and what the loop would do
with each device is read from the helpers and the loaders it builds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from ddfp_examples import runtime
from ddfp_examples.runtime import (
    DistributedContext,
    amp_dtype,
    ddp_device_ids,
    grad_scaler,
    pin_memory,
    process_group_backend,
    select_device,
    setup_distributed,
    uses_sync_batchnorm,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def fake_hardware(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    "cuda,mps,expected",
    [
        (True, True, torch.device("cuda", 0)),
        (True, False, torch.device("cuda", 0)),
        (False, True, torch.device("mps")),
        (False, False, torch.device("cpu")),
    ],
)
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    fake_hardware(monkeypatch, cuda, mps)
    assert select_device("auto") == expected
    assert select_device("cpu") == torch.device("cpu")


def test_explicit_device_is_used_when_present_and_its_cuda_index_is_the_local_rank(monkeypatch):
    fake_hardware(monkeypatch, cuda=True, mps=True)
    assert select_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert select_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert select_device("mps") == torch.device("mps")


@pytest.mark.parametrize(
    "requested,match",
    [
        ("cuda", "--device cuda was asked for, but torch sees no CUDA device"),
        ("mps", "--device mps was asked for, but torch sees no MPS device"),
        ("tpu", r"device must be one of \('auto', 'cpu', 'cuda', 'mps'\)"),
    ],
)
def test_a_device_the_machine_lacks_is_a_clear_error(monkeypatch, requested, match):
    fake_hardware(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ValueError, match=match):
        select_device(requested)


def test_one_process_on_mps_needs_no_process_group_and_several_are_refused(monkeypatch):
    fake_hardware(monkeypatch, cuda=False, mps=True)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed("auto")
    assert ctx.device == torch.device("mps") and not ctx.distributed and ctx.is_main
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="several processes on mps are not supported"):
        setup_distributed("mps")
    assert not torch.distributed.is_initialized()


def test_process_groups_use_nccl_on_cuda_and_gloo_on_the_cpu():
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize(
    "device,pinned,ddp_ids",
    [
        (torch.device("cuda", 2), True, [2]),
        (torch.device("mps"), False, None),
        (torch.device("cpu"), False, None),
    ],
)
def test_pinned_memory_and_ddp_device_ids_are_for_cuda_only(device, pinned, ddp_ids):
    assert pin_memory(device) is pinned
    assert ddp_device_ids(device) == ddp_ids


def test_sync_batchnorm_only_for_several_cuda_processes():
    def ctx(world_size: int, device: str) -> DistributedContext:
        return DistributedContext(0, world_size, 0, torch.device(device))

    assert uses_sync_batchnorm(ctx(2, "cuda"))
    assert not uses_sync_batchnorm(ctx(1, "cuda"))
    assert not uses_sync_batchnorm(ctx(2, "cpu"))
    assert not uses_sync_batchnorm(ctx(1, "mps"))


def test_amp_dtype_per_flag_and_a_device_without_autocast_is_a_clear_error(monkeypatch):
    cpu = torch.device("cpu")
    assert amp_dtype("none", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_dtype("fp8", cpu)
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ValueError, match="--amp bf16: this PyTorch has no autocast on mps"):
        amp_dtype("bf16", torch.device("mps"))
    assert amp_dtype("none", torch.device("mps")) is None


def test_grad_scaler_is_on_for_fp16_only_and_for_the_device_type():
    cpu = torch.device("cpu")
    assert grad_scaler("fp16", cpu).is_enabled()
    assert not grad_scaler("bf16", cpu).is_enabled()
    assert not grad_scaler("none", cpu).is_enabled()
    assert grad_scaler("fp16", cpu)._device == "cpu"


def test_rng_state_saves_and_restores_the_mps_generator_when_there_is_one(monkeypatch):
    fake_hardware(monkeypatch, cuda=False, mps=True)
    mps_state = torch.tensor([7, 8, 9], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: mps_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    state = runtime.rng_state()
    assert torch.equal(state["mps"], mps_state)
    runtime.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], mps_state)
    fake_hardware(monkeypatch, cuda=False, mps=False)
    assert "mps" not in runtime.rng_state()


def test_the_loop_accepts_mps_and_pins_memory_for_cuda_loaders_only(tiny_voc_root, tmp_path):
    from test_example_loop import load_script, tiny_args

    module = load_script()
    assert module.parse_args(tiny_args(tiny_voc_root, tmp_path, "--device", "mps")).device == "mps"
    args = module.parse_args(tiny_args(tiny_voc_root, tmp_path))
    for device, pinned in (("cuda", True), ("mps", False), ("cpu", False)):
        ctx = DistributedContext(0, 1, 0, torch.device(device))
        loaders, _, _ = module.build_loaders(args, ctx)
        assert all(loader.pin_memory is pinned for loader in loaders.values()), device


def test_the_loop_asked_for_a_missing_mps_device_stops_with_a_clear_error(
    tiny_voc_root, tmp_path, monkeypatch
):
    from test_example_loop import load_script, tiny_args

    fake_hardware(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ValueError, match="no MPS device"):
        load_script().main(tiny_args(tiny_voc_root, tmp_path, "--device", "mps"))


def test_benchmark_synchronisation_waits_on_cuda_and_mps_and_not_on_the_cpu(monkeypatch):
    from benchmarks import common

    calls = []
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device))
    )
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    common.synchronize("cpu")
    common.synchronize("mps")
    common.synchronize(torch.device("cuda", 1))
    assert calls == [("mps", None), ("cuda", torch.device("cuda", 1))]


def test_benchmark_memory_on_mps_is_the_growth_of_the_emptied_pool(monkeypatch):
    from benchmarks import common

    mib = 1024 * 1024
    pool = [40 * mib]
    events = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: events.append("empty"))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: pool[0])

    def work():
        events.append("work")
        pool[0] += 96 * mib

    result = common.measure_peak_memory(work, "mps")
    assert result["peak_mib"] == 96.0 and result["baseline_mib"] == 40.0
    assert events == ["sync", "empty", "work", "sync"]
    assert "driver_allocated_memory" in result["method"]


def test_benchmark_device_check_names_a_missing_device(monkeypatch):
    from benchmarks import common

    fake_hardware(monkeypatch, cuda=False, mps=False)
    assert common.require_device("cpu") == torch.device("cpu")
    for name in ("cuda", "mps"):
        with pytest.raises(SystemExit, match=f"--device {name} was asked for"):
            common.require_device(name)
