"""The benchmarks compare like with like: the reference design and ddfp_lib compute the same thing.

Nothing here is timed; the speed and memory numbers live in ``benchmarks/results``.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The reference design is rebuilt on FrEIA, which the [test] and [bench] extras install.
pytest.importorskip("FrEIA")

from benchmarks import common, flow_coupling, perturbation  # noqa: E402
from benchmarks.reference_design import (  # noqa: E402
    ReferenceDensity,
    copy_reference_flow,
    fuse_block,
    reference_perturbation,
    repeated_mixture_log_prob,
)
from ddfp_lib import DensityDescendingPerturbation, FlowDensityEstimator  # noqa: E402


def _shared_pair(dim: int = 8, num_classes: int = 3, hidden: int = 16):
    reference = ReferenceDensity(dim, num_classes, num_blocks=2, hidden_dim=hidden, seed=1)
    estimator = FlowDensityEstimator(dim, num_classes, num_blocks=2, hidden_dim=hidden, seed=2)
    copy_reference_flow(reference, estimator)
    return reference, estimator


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_reference_flow_and_ddfp_lib_log_prob_agree_in_float64():
    reference, estimator = _shared_pair()
    reference.double()
    estimator.double()
    x = 2.0 * torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = reference.log_prob(x)
    z, log_det = estimator.flow(x)
    actual = estimator.prior.log_prob(z) + log_det
    assert log_det.abs().min() > 1e-3, "the copied flow must not be volume preserving"
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-6)


def test_reference_flow_and_ddfp_lib_public_log_prob_agree_in_float32():
    reference, estimator = _shared_pair()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(estimator.log_prob(x), reference.log_prob(x), rtol=1e-5, atol=1e-3)


def test_repeated_mixture_matches_torch_distributions_mixture():
    generator = torch.Generator().manual_seed(2)
    means = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    z = 3.0 * torch.randn(20, 4, generator=generator, dtype=torch.float64)
    components = torch.distributions.Independent(
        torch.distributions.Normal(means, torch.ones_like(means)), 1
    )
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(5, dtype=torch.float64)), components
    )
    torch.testing.assert_close(repeated_mixture_log_prob(z, means), mixture.log_prob(z))


def test_reference_and_ddfp_lib_deltas_agree_with_shared_weights_and_dropout():
    reference, estimator = _shared_pair(dim=16, num_classes=4, hidden=24)
    torch.manual_seed(3)
    head = fuse_block(in_channels=12, channels=16).train()
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(2, 12, 7, 7, generator=generator)
    mask = torch.rand(2, 7, 7, generator=generator) < 0.6
    torch.manual_seed(5)
    expected = reference_perturbation(reference, head, features, mask, eps=4.0)
    torch.manual_seed(5)
    perturbed = DensityDescendingPerturbation(estimator, eps=4.0)(features, head=head, mask=mask)
    delta = perturbed - features
    assert _cosine(delta, expected) > 0.999
    norms = delta.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 4.0), rtol=0.0, atol=1e-4)


def test_reference_and_ddfp_lib_deltas_agree_on_rows_without_head():
    reference, estimator = _shared_pair(dim=8, num_classes=3, hidden=16)
    rows = torch.randn(40, 8, generator=torch.Generator().manual_seed(6))
    valid = torch.ones(40, dtype=torch.bool)
    valid[::3] = False
    expected = reference_perturbation(reference, None, rows, valid, eps=2.0)
    delta = DensityDescendingPerturbation(estimator, eps=2.0)(rows, mask=valid) - rows
    assert _cosine(delta, expected) > 0.999
    assert float(delta[~valid].abs().max()) == 0.0


def test_every_library_design_times_the_same_computation_as_the_reference():
    setup = perturbation.build_setup(4, "cpu", batch=1, size=5, density=0.5)
    # The fuse block runs in training mode (Dropout2d): equal seeds give equal dropout masks.
    outputs = {}
    for design in perturbation.DESIGNS:
        torch.manual_seed(11)
        output = perturbation._step(design, setup, chunk_rows=7)()
        outputs[design] = perturbation._delta(design, output, setup["features"])
    for design in ("ddfp_lib", "ddfp_lib_dense", "ddfp_lib_chunked"):
        assert _cosine(outputs[design], outputs["reference"]) > 0.999, design
        torch.testing.assert_close(outputs[design], outputs["ddfp_lib"], rtol=1e-4, atol=1e-5)


def test_flop_count_matches_torch_flop_counter_for_head_and_density():
    from torch.utils.flop_counter import FlopCounterMode

    head = fuse_block(in_channels=304, channels=256).train().requires_grad_(False)
    features = torch.randn(1, 304, 3, 3, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        head(features).sum().backward()
    head_flops = counter.get_total_flops()
    estimator = FlowDensityEstimator(256, 21, seed=0).requires_grad_(False)
    rows = torch.randn(5, 256, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        estimator.log_prob_rows(rows).sum().backward()
    density_flops = counter.get_total_flops()
    assert perturbation.perturbation_flops(9, 0, 21, with_head=True) == head_flops
    assert perturbation.perturbation_flops(5, 5, 21, with_head=False) == density_flops


def test_fit_exponent_recovers_a_known_power_law():
    sizes = [1e3, 4e3, 1.6e4, 6.4e4]
    assert perturbation.fit_exponent(sizes, [3e-6 * n**1.0 for n in sizes]) == pytest.approx(1.0)
    assert perturbation.fit_exponent(sizes, [2.0 * n**0.5 for n in sizes]) == pytest.approx(0.5)
    assert perturbation.fit_exponent([10.0], [1.0]) is None


def test_interleaved_times_one_call_a_turn_after_an_untimed_one_and_rotates_the_order():
    now, calls = [0.0], []

    def work(name: str, step: float):
        def call():
            calls.append(name)
            now[0] += step * calls.count(name)  # the k-th call of `name` takes k * step seconds

        return call

    timers = {
        name: common.make_timer(work(name, step), clock=lambda: now[0])
        for name, step in (("a", 1.0), ("b", 10.0))
    }
    measured = common.interleaved(timers, rounds=3)
    assert calls == [*"aabb", *"bbaa", *"aabb"]
    assert measured["a"].times == [2.0, 4.0, 6.0]
    assert measured["b"].times == [20.0, 40.0, 60.0]
    found = common.summary(measured["a"])
    assert found["times"] == [2.0, 4.0, 6.0]
    assert found["median"] == pytest.approx(np.median(found["times"]))
    assert found["iqr"] == pytest.approx(np.subtract(*np.percentile(found["times"], [75, 25])))
    assert found["mean"] == pytest.approx(4.0)


def test_peak_memory_sees_torch_cpu_allocations():
    size_mib = 160
    result = common.measure_peak_memory(
        lambda: torch.ones(size_mib * 1024 * 1024 // 4).sum(), "cpu"
    )
    assert result["peak_mib"] >= 0.9 * size_mib


def test_default_command_is_the_one_to_type_from_the_repository_root(monkeypatch):
    import types

    script = types.ModuleType("__main__")
    script.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", script)
    monkeypatch.setattr(sys, "argv", [str(common.REPO_ROOT / "benchmarks" / "x.py"), "--a", "1"])
    assert common.command_line() == ["python", "benchmarks/x.py", "--a", "1"]
    module = types.ModuleType("__main__")
    module.__spec__ = types.SimpleNamespace(name="benchmarks.x")
    monkeypatch.setitem(sys.modules, "__main__", module)
    assert common.command_line() == ["python", "-m", "benchmarks.x", "--a", "1"]


def test_write_results_records_machine_torch_command_and_date(tmp_path: Path):
    numbers = {"median_s": 1.5, "rows": [1, 2]}
    path = common.write_results(
        "unit", numbers, results_dir=tmp_path, argv=["python", "-m", "x", "--quick"]
    )
    assert path == tmp_path / "unit.json"
    written = json.loads(path.read_text())
    assert written["results"] == numbers
    assert written["benchmark"] == "unit"
    assert written["torch"] == torch.__version__
    assert written["command"] == "python -m x --quick"
    assert written["machine"]["cpu_count"] >= 1
    assert written["machine"]["torch_threads"] == torch.get_num_threads()
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(
        written["date"]
    )
    assert abs(age.total_seconds()) < 60
    with pytest.raises(ValueError, match="plain file stem"):
        common.write_results("../escape", numbers, results_dir=tmp_path)


def test_flow_comparison_shares_weights_and_nflows_block_transforms_both_halves():
    flows = flow_coupling.build_flows(seed=3)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(8))
    base, base_gradient = flow_coupling.flow_log_prob_gradient(flows["ddfp_lib"], flows["means"], x)
    freia, freia_gradient = flow_coupling.flow_log_prob_gradient(flows["freia"], flows["means"], x)
    chunked, _ = flow_coupling.flow_log_prob_gradient(flows["ddfp_lib"], flows["means"], x, 5)
    torch.testing.assert_close(freia, base, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(freia_gradient, base_gradient, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked, base)
    first_coupling, second_coupling = list(flows["nflows"]._transforms)[:2]
    with torch.no_grad():
        y, _ = second_coupling(first_coupling(x)[0])
    assert (y[:, :128] - x[:, :128]).abs().min() > 0, "nflows block must transform the first half"
    assert (y[:, 128:] - x[:, 128:]).abs().min() > 0, "and the second half"


@pytest.mark.slow
def test_quick_perturbation_benchmark_writes_matching_designs(tmp_path: Path):
    command = [sys.executable, "-m", "benchmarks.perturbation", "--quick", "--threads", "1"]
    command += ["--sections", "shapes", "--results-dir", str(tmp_path)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)
    written = json.loads((tmp_path / "perturbation_quick.json").read_text())
    assert written["command"].startswith("python -m benchmarks.perturbation --quick")
    (entry,) = written["results"]["shapes"]
    for design in perturbation.DESIGNS:
        result = entry["designs"][design]
        assert result["status"] == "ok"
        assert result["memory"]["peak_mib"] > 0 and len(result["time"]["times"]) == 2
    for design in ("ddfp_lib", "ddfp_lib_dense", "ddfp_lib_chunked"):
        assert entry["designs"][design]["cosine_vs_reference"]["overall"] > 0.999
