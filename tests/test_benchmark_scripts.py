"""benchmarks/train_step.py: its numbers come from what it claims.

Nothing here asserts a speed; the measured numbers live in ``benchmarks/results``. The slow tests
profile the loop and run the script's ``--quick`` mode, and check the JSON fields the docs render.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import train_step  # noqa: E402


@pytest.fixture(scope="module")
def loop():
    return train_step.load_loop()


# --------------------------------------------------------------------------------- train_step
def test_synthetic_batch_has_the_loaders_layout_and_pads_a_quarter_of_each_unlabelled_image():
    (img_x, mask_x), u, u_mix = train_step.synthetic_batch(3, 16, torch.device("cpu"), seed=1)
    assert img_x.shape == (3, 3, 16, 16) and img_x.dtype == torch.float32
    assert mask_x.shape == (3, 16, 16) and mask_x.dtype == torch.long
    assert int(mask_x.min()) >= 0 and int(mask_x.max()) < train_step.NUM_CLASSES
    assert len(u) == 6 and len(u_mix) == 6
    for part in (u, u_mix):
        assert all(t.shape == (3, 3, 16, 16) for t in part[:3])
        ignore_mask, box1, box2 = part[3:]
        assert (ignore_mask == 255).float().mean() == pytest.approx(0.25)
        assert box1.sum() == box2.sum() == 3 * 8 * 8
        assert not torch.equal(box1, box2)
    assert not torch.equal(u[0], u_mix[0])


def test_overheads_are_median_ratios_and_the_split_over_the_rest_of_the_profiled_step():
    def entry(median, split=None):
        body = {"cpu": {"step": {"median": median}}}
        if split is not None:
            parts = dict(zip(train_step.SPLIT_PARTS, split))
            body["profile"] = {
                "step": {"median": median / 2},
                "split": {part: {"median": s} for part, s in parts.items()},
            }
        return body

    configs = {
        "none": entry(8.0),
        "dropout": entry(10.0),
        "ddfp": entry(10.0, (0.5, 0.25, 0.25)),
        "both": entry(12.0, (1.0, 0.5, 0.5)),
    }
    found = train_step.overheads(configs, "cpu")
    assert found == pytest.approx(
        {"both_vs_dropout": 0.2, "ddfp_vs_dropout": 0.0, "ddfp_vs_none": 0.25,
         "dropout_vs_none": 0.25}
    )  # fmt: skip
    split = train_step.split_overheads(configs)
    assert split == pytest.approx({"split_ddfp": 1.0 / 4.0, "split_both": 2.0 / 4.0})


def test_a_range_takes_in_the_backward_of_its_operations_and_counts_an_inner_backward_once():
    from torch.profiler import ProfilerActivity, profile, record_function

    conv, linear = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Linear(8, 8)
    x = torch.randn(2, 4, 8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        h = linear(x)
        with record_function("branch"):
            y = conv(h)
        with record_function("own_gradient"):
            leaf = h.detach().requires_grad_()
            torch.autograd.grad(torch.tanh(leaf).sum(), leaf)
        (y.sum() + h.sum()).backward()
    events = prof.events()

    def own(name):
        [event] = [e for e in events if e.name == name]
        return event.cpu_time_total / 1e6

    [conv_backward] = [
        e.cpu_time_total / 1e6
        for e in events
        if e.name == "autograd::engine::evaluate_function: ConvolutionBackward0"
    ]
    assert train_step.range_seconds(events, "branch") == [
        pytest.approx(own("branch") + conv_backward)
    ]
    assert train_step.range_seconds(events, "own_gradient") == [pytest.approx(own("own_gradient"))]
    assert train_step.range_seconds(events, "no_such_range") == []


@pytest.mark.slow
def test_profile_split_reads_every_ddfp_range_and_the_branch_takes_in_its_backward(loop):
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = train_step.build_step(
            loop, "ddfp", "mobilenet_v2", 33, 1, torch.device("cpu"), threshold=0.0
        )
        split = train_step.profile_split(step, iterations=2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        torch.set_num_threads(threads)
    assert len(split["step"]["times"]) == 2
    for part in train_step.SPLIT_PARTS:
        assert len(split["split"][part]["times"]) == 2
        assert split["split"][part]["median"] > 0, f"{part} was never measured"
    assert sum(split["split_share_of_step"].values()) < 1.0
    assert step.state.flow_trainer.num_steps == 3, "one flow step per iteration"
    events = prof.events()
    [branch] = [e for e in events if e.name == train_step.SPLIT_PARTS["perturbed_branch"]]
    [with_backward] = train_step.range_seconds(events, branch.name)
    assert with_backward > 1.5 * branch.cpu_time_total / 1e6, "the branch's backward is missing"


# ---------------------------------------------------------------------------- --quick end to end
@pytest.mark.slow
def test_train_step_quick_writes_every_field_the_docs_render(tmp_path):
    command = [
        sys.executable, "-m", "benchmarks.train_step", "--quick", "--threads", "1",
        "--fp", "dropout", "ddfp", "both", "--results-dir", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, timeout=300)
    payload = json.loads((tmp_path / "train_step_cpu_quick.json").read_text())
    assert payload["benchmark"] == "train_step_cpu_quick" and payload["device"] == "cpu"
    results = payload["results"]
    setup = results["setup"]
    assert (setup["backbone"], setup["crop_size"], setup["labeled_per_iteration"]) == (
        "mobilenet_v2", 33, 1,
    )  # fmt: skip
    assert setup["repeats"] == 2 and setup["torch_threads"] == 1 and setup["profile_steps"] == 1
    assert list(setup["clocks"]) == ["cpu"], "the CPU clock is the default on the CPU"
    assert set(results["configs"]) == {"dropout", "ddfp", "both"}
    for fp, entry in results["configs"].items():
        step = entry["cpu"]["step"]
        assert len(step["times"]) == 2 and step["iqr"] >= 0
        assert min(step["times"]) <= step["median"] <= max(step["times"])
        assert ("profile" in entry) == (fp != "dropout")
    both = results["configs"]["both"]["profile"]
    for part in train_step.SPLIT_PARTS:
        share = both["split"][part]["median"] / both["step"]["median"]
        assert both["split_share_of_step"][part] == pytest.approx(share)
    medians = {fp: e["cpu"]["step"]["median"] for fp, e in results["configs"].items()}
    overhead = results["overhead"]
    assert overhead["cpu"]["both_vs_dropout"] == pytest.approx(
        medians["both"] / medians["dropout"] - 1
    )
    assert set(overhead["profile"]) == {"split_ddfp", "split_both"}
