"""examples/voc_unimatch_plus_ddfp.py end to end on a generated VOC-layout folder."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddfp_examples.datasets import DATASETS
from ddfp_examples.runtime import DistributedContext

from ddfp_lib import FlowDensityEstimator

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "voc_unimatch_plus_ddfp.py"


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("voc_unimatch_plus_ddfp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(root, out, *extra):
    return [
        "--dataset", "voc", "--data-root", str(root),
        "--labeled-list", str(root / "train_l.txt"), "--unlabeled-list", str(root / "train_u.txt"),
        "--val-list", str(root / "val.txt"), "--backbone", "mobilenet_v2", "--crop-size", "32",
        "--batch-size", "2", "--epochs", "1", "--iters-per-epoch", "2", "--workers", "0",
        "--no-progress", "--out", str(out), "--threshold", "0.0", *extra,
    ]  # fmt: skip


def read_log(out):
    with open(out / "log.csv") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize(
    "extra,streams",
    [
        (["--fp", "none"], {"loss_x", "loss_s1", "loss_s2"}),
        (["--fp", "dropout"], {"loss_x", "loss_s1", "loss_s2", "loss_fp"}),
        (["--fp", "ddfp"], {"loss_x", "loss_s1", "loss_s2", "loss_ddfp", "flow_nll"}),
        (["--fp", "both"], {"loss_x", "loss_s1", "loss_s2", "loss_fp", "loss_ddfp", "flow_nll"}),
        (["--mode", "supervised"], {"loss_x"}),
        (
            ["--fp", "both", "--amp", "bf16"],
            {"loss_x", "loss_s1", "loss_fp", "loss_ddfp", "flow_nll"},
        ),
        # fp16 runs the gradient scaler, here the CPU's: the same code path as on CUDA or MPS.
        (
            ["--fp", "both", "--amp", "fp16"],
            {"loss_x", "loss_s1", "loss_fp", "loss_ddfp", "flow_nll"},
        ),
        (["--fp", "ddfp", "--aux-bn"], {"loss_x", "loss_s1", "loss_ddfp", "flow_nll"}),
        (
            ["--fp", "ddfp", "--perturbation", "random_direction"],
            {"loss_x", "loss_s1", "loss_ddfp"},
        ),
        (["--fp", "ddfp", "--perturbation", "vat"], {"loss_x", "loss_s1", "loss_ddfp"}),
    ],
)
def test_two_iterations_of_every_mode_train_log_and_checkpoint(
    tiny_voc_root, tmp_path, extra, streams
):
    module = load_script()
    summary = module.main(tiny_args(tiny_voc_root, tmp_path, "--log-every", "1", *extra))
    assert summary["iterations"] == 2 and not summary["stopped_early"]
    assert 0.0 <= summary["final_miou"] <= 1.0
    rows = read_log(tmp_path)
    assert len(rows) == 2
    logged = {k for k, v in rows[-1].items() if v != ""}
    assert streams <= logged
    all_streams = {"loss_fp", "loss_ddfp", "flow_nll", "loss_s1"}
    assert not (all_streams - streams) & logged, "a stream that is off must not be logged"
    for key in streams:
        assert torch.isfinite(torch.tensor(float(rows[-1][key])))
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=False)
    assert ("flow" in checkpoint) == ("flow_nll" in streams)
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "summary.json").is_file()


def test_flow_weights_change_and_model_weights_change_in_a_ddfp_run(tiny_voc_root, tmp_path):
    module = load_script()
    module.main(tiny_args(tiny_voc_root, tmp_path / "a", "--fp", "ddfp", "--stop-after", "1"))
    first = torch.load(tmp_path / "a" / "latest.pt", weights_only=False)
    module.main(tiny_args(tiny_voc_root, tmp_path / "a", "--fp", "ddfp", "--resume"))
    second = torch.load(tmp_path / "a" / "latest.pt", weights_only=False)
    assert any(not torch.equal(first["flow"][k], second["flow"][k]) for k in first["flow"])
    assert any(
        not torch.equal(first["model"][k], second["model"][k])
        for k in first["model"]
        if first["model"][k].is_floating_point()
    )


def test_resume_after_interruption_gives_the_same_weights_as_an_uninterrupted_run(
    tiny_voc_root, tmp_path
):
    module = load_script()
    common = ["--fp", "both", "--epochs", "2", "--seed", "3"]
    module.main(tiny_args(tiny_voc_root, tmp_path / "straight", *common))
    summary = module.main(
        tiny_args(tiny_voc_root, tmp_path / "split", *common, "--stop-after", "3")
    )
    assert summary["stopped_early"] and summary["iterations"] == 3
    resumed = module.main(tiny_args(tiny_voc_root, tmp_path / "split", *common, "--resume"))
    assert resumed["iterations"] == 4
    straight = torch.load(tmp_path / "straight" / "latest.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "latest.pt", weights_only=False)
    for part in ("model", "flow"):
        for key, value in straight[part].items():
            assert torch.allclose(value.float(), split[part][key].float(), atol=1e-6), (
                f"{part}.{key}"
            )


def test_resumed_run_reports_the_time_of_both_parts(tiny_voc_root, tmp_path):
    import time

    module = load_script()
    args = tiny_args(tiny_voc_root, tmp_path, "--mode", "supervised")
    first = module.main([*args, "--stop-after", "1"])
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=False)
    assert 0 < checkpoint["progress"]["seconds"] <= first["seconds"] + 1e-6
    checkpoint["progress"]["seconds"] = 1000.0
    torch.save(checkpoint, tmp_path / "latest.pt")
    tic = time.time()
    resumed = module.main([*args, "--resume"])
    assert 1000.0 < resumed["seconds"] < 1000.0 + (time.time() - tic)
    assert torch.load(tmp_path / "latest.pt", weights_only=False)["progress"]["seconds"] > 1000.0


def test_two_process_gloo_run_trains_and_keeps_one_flow(tiny_voc_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(SCRIPT), *tiny_args(tiny_voc_root, tmp_path, "--fp", "both", "--device", "cpu"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x2" in result.stdout
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=False)
    # 6 unlabelled images over 2 ranks in batches of 2: one iteration per epoch.
    assert checkpoint["progress"]["iteration"] == 1 and len(checkpoint["rng"]) == 2
    assert "flow" in checkpoint


def test_missing_data_root_is_a_clear_error(tmp_path):
    module = load_script()
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        module.main(
            [
                "--dataset",
                "voc",
                "--data-root",
                str(missing),
                "--num-labeled",
                "2",
                "--val-list",
                str(tmp_path / "val.txt"),
                "--out",
                str(tmp_path / "o"),
            ]  # fmt: skip
        )


def test_mask_with_labels_outside_the_classes_is_a_clear_error(tiny_voc_root, tmp_path):
    from PIL import Image

    root = tmp_path / "bad"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (40, 40)).save(root / "JPEGImages" / f"{stem}.jpg")
        Image.new("L", (40, 40), 30).save(root / "SegmentationClass" / f"{stem}.png")
    line = "JPEGImages/a.jpg SegmentationClass/a.png"
    (root / "train_l.txt").write_text(line + "\n")
    (root / "train_u.txt").write_text(line + "\n" + line + "\n")
    (root / "val.txt").write_text("JPEGImages/b.jpg SegmentationClass/b.png\n")
    module = load_script()
    with pytest.raises(ValueError, match="30"):
        module.main(tiny_args(root, tmp_path / "o", "--mode", "supervised"))


def test_warmup_epochs_train_the_labelled_loss_only_then_every_stream(tiny_voc_root, tmp_path):
    module = load_script()
    args = tiny_args(tiny_voc_root, tmp_path, "--log-every", "1", "--fp", "ddfp")
    args[args.index("--epochs") + 1] = "2"
    summary = module.main([*args, "--warmup-epochs", "1"])
    assert summary["iterations"] == 4
    rows = read_log(tmp_path)
    assert [row["epoch"] for row in rows] == ["0", "0", "1", "1"]
    for row in rows[:2]:
        assert row["loss_x"] != "" and row["loss_s1"] == "" and row["flow_nll"] == ""
    for row in rows[2:]:
        assert all(row[k] != "" for k in ("loss_x", "loss_s1", "loss_ddfp", "flow_nll"))


def test_warmup_must_leave_a_semi_supervised_epoch(tiny_voc_root, tmp_path):
    with pytest.raises(SystemExit):
        load_script().main(tiny_args(tiny_voc_root, tmp_path, "--warmup-epochs", "1"))


def test_resize_range_defaults_per_dataset_and_reaches_the_training_sets(tiny_voc_root, tmp_path):
    from ddfp_examples.datasets import DATASETS

    module = load_script()
    demo = module.parse_args(["--dataset", "demo"])
    assert demo.resize_range == DATASETS["demo"].resize_range
    voc = module.parse_args(tiny_args(tiny_voc_root, tmp_path))
    assert voc.resize_range == (0.5, 2.0)
    args = module.parse_args(tiny_args(tiny_voc_root, tmp_path, "--resize-range", "0.9", "1.1"))
    assert args.resize_range == (0.9, 1.1)
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    loaders, _, _ = module.build_loaders(args, ctx)
    for name in ("x", "u"):
        assert loaders[name].dataset.dataset.ratio_range == (0.9, 1.1)


def _without_iteration_cap(args):
    index = args.index("--iters-per-epoch")
    return args[:index] + args[index + 2 :]


def test_supervised_epoch_matches_the_semi_epoch_or_passes_over_a_larger_labelled_set(
    tiny_voc_root, tmp_path
):
    module = load_script()
    # 3 labelled, 6 unlabelled, batch 2: both modes take one pass over the unlabelled set.
    for mode in ("semi", "supervised"):
        args = _without_iteration_cap(tiny_args(tiny_voc_root, tmp_path / mode, "--mode", mode))
        assert module.main(args)["iterations"] == 3
    # Every training image labelled (the 3 labelled and the 3 unlabelled lines that have a mask,
    # none unlabelled): a supervised pass over them.
    with_mask = [
        line for line in (tiny_voc_root / "train_u.txt").read_text().split("\n") if " " in line
    ]
    lines = (tiny_voc_root / "train_l.txt").read_text() + "\n".join(with_mask) + "\n"
    assert len(lines.split()) == 12, "6 lines of image and mask"
    (tmp_path / "all.txt").write_text(lines)
    (tmp_path / "none.txt").write_text("")
    args = _without_iteration_cap(
        tiny_args(tiny_voc_root, tmp_path / "full", "--mode", "supervised")
    )
    args[args.index("--labeled-list") + 1] = str(tmp_path / "all.txt")
    args[args.index("--unlabeled-list") + 1] = str(tmp_path / "none.txt")
    assert module.main(args)["iterations"] == 3
    args[args.index("--mode") + 1] = "semi"
    with pytest.raises(ValueError, match="every training image is labelled"):
        module.main(args)


def test_aspp_dilations_flag_reaches_the_model_and_defaults_to_the_model_rule(
    tiny_voc_root, tmp_path
):
    module = load_script()
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))

    def branch_dilations(*extra):
        args = module.parse_args(
            tiny_args(tiny_voc_root, tmp_path, "--backbone", "mobilenet_v2", *extra)
        )
        model = module.build_model(args, 21, ctx)
        return [b[0].dilation[0] for b in model.aspp.branches if b[0].kernel_size == (3, 3)]

    # MobileNetV2 runs at output stride 8, so the rule doubles 6/12/18.
    assert branch_dilations() == [12, 24, 36]
    assert branch_dilations("--aspp-dilations", "1", "2", "3") == [1, 2, 3]
    with pytest.raises(SystemExit):
        module.parse_args(tiny_args(tiny_voc_root, tmp_path, "--aspp-dilations", "0", "2", "3"))


@pytest.mark.parametrize("bad", [["0", "1"], ["1.5", "1.0"], ["-1", "2"]])
def test_bad_resize_range_is_rejected(tiny_voc_root, tmp_path, bad):
    with pytest.raises(SystemExit):
        load_script().parse_args(tiny_args(tiny_voc_root, tmp_path, "--resize-range", *bad))


def test_feature_perturbation_default_is_both_streams_and_a_given_flag_wins(
    tiny_voc_root, tmp_path
):
    module = load_script()
    assert module.parse_args(["--dataset", "demo"]).fp == "both"
    assert module.parse_args(tiny_args(tiny_voc_root, tmp_path)).fp == "both"
    assert module.parse_args(["--dataset", "demo", "--fp", "ddfp"]).fp == "ddfp"
    assert module.parse_args(["--dataset", "demo", "--mode", "supervised"]).fp == "none"


def test_eps_default_is_one_on_the_demo_and_four_elsewhere(tiny_voc_root, tmp_path):
    module = load_script()
    assert module.parse_args(["--dataset", "demo"]).eps == 1.0
    assert module.parse_args(tiny_args(tiny_voc_root, tmp_path)).eps == 4.0
    assert module.parse_args(["--dataset", "demo", "--eps", "2.5"]).eps == 2.5


def test_evaluating_more_often_does_not_change_the_training(tiny_voc_root, tmp_path):
    module = load_script()
    common = ["--fp", "both", "--epochs", "2", "--seed", "5"]
    module.main(tiny_args(tiny_voc_root, tmp_path / "every", *common, "--eval-every", "1"))
    module.main(tiny_args(tiny_voc_root, tmp_path / "last", *common, "--eval-every", "2"))
    every = torch.load(tmp_path / "every" / "latest.pt", weights_only=False)
    last = torch.load(tmp_path / "last" / "latest.pt", weights_only=False)
    assert len(every["progress"]["history"]) == 2 and len(last["progress"]["history"]) == 1
    for key, value in every["model"].items():
        assert torch.equal(value, last["model"][key]), key


def one_process_gloo_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'gloo_store'}", rank=0, world_size=1
    )
    return dist


@pytest.mark.parametrize("fp", ["ddfp", "both"])
@pytest.mark.parametrize(
    "held_back,schedule",
    [
        (["--warmup-epochs", "1"], [(True, True), (True, True), (False, False), (False, False)]),
        (["--flow-burn-in", "1"], [(False, True), (False, True), (False, False), (False, False)]),
    ],
    ids=["warmup", "flow_burn_in"],
)
def test_ddp_with_aux_bn_survives_iterations_without_ddfp_then_trains_every_stream(
    tiny_voc_root, tmp_path, fp, held_back, schedule
):
    module = load_script()
    args = module.parse_args(
        tiny_args(tiny_voc_root, tmp_path, "--fp", fp, "--aux-bn", "--epochs", "2") + held_back
    )
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    loaders, _, _ = module.build_loaders(args, ctx)
    batch = next(zip(loaders["x"], loaders["u"], loaders["u_mix"]))
    torch.manual_seed(0)
    model = module.build_model(args, 21, ctx)
    streams = module.UniMatchDDFP(model, args.fp, args.aux_bn, args.threshold)
    dist = one_process_gloo_group(tmp_path)
    try:
        net = module.wrap_distributed(streams, args, ctx)
        state = module.build_training_state(args, model, DATASETS["voc"], 4, ctx.device)
        aux = {k: v.clone() for k, v in model.head.state_dict().items() if ".aux." in k}
        for warmup, burn_in in schedule:
            logged = module.train_step(
                net, [batch], state, args, ctx.device, warmup=warmup, burn_in=burn_in
            )
            assert torch.isfinite(logged["loss"])
        assert "loss_ddfp" in logged
        moved = [
            k
            for k, v in model.head.state_dict().items()
            if ".aux." in k and not torch.equal(v, aux[k])
        ]
        assert moved, "the DDFP stream must train the auxiliary BatchNorm after the warm-up"
    finally:
        dist.destroy_process_group()


class RecordingPerturbation(torch.nn.Module):
    """Calls a perturbation and keeps its inputs, its output and the RNG state it started from."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, features, head=None, mask=None):
        rng = torch.get_rng_state()
        out = self.inner(features, head=head, mask=mask)
        self.calls.append((features.detach().clone(), mask, rng, out.detach().clone()))
        return out


def test_aux_bn_ddfp_direction_goes_through_the_auxiliary_batchnorm():
    from ddfp_lib import DensityDescendingPerturbation, FlowDensityEstimator, perturbed_bn
    from ddfp_lib.batchnorm import DualBatchNorm2d

    module = load_script()
    torch.manual_seed(0)
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    args = module.parse_args(["--dataset", "demo", "--backbone", "mobilenet_v2"])
    model = module.build_model(args, 4, ctx)
    streams = module.UniMatchDDFP(model, "ddfp", aux_bn=True, threshold=0.0).train()
    with torch.no_grad():
        for layer in model.head.modules():
            if isinstance(layer, DualBatchNorm2d):
                layer.aux.weight.mul_(3.0).add_(torch.randn_like(layer.aux.weight))
                layer.aux.bias.add_(torch.randn_like(layer.aux.bias))
                layer.aux.running_mean.add_(1.0)
    estimator = FlowDensityEstimator(model.classifier.in_channels, 4, hidden_dim=16, seed=0)
    ddfp = DensityDescendingPerturbation(estimator, eps=4.0)
    recorder = RecordingPerturbation(ddfp)
    images = [torch.rand(2, 3, 32, 32) for _ in range(4)]
    ddfp_stream = module.DensityStream(perturbation=recorder, head=model.head)
    streams(images[0], (*images[1:], torch.zeros(2, 32, 32, dtype=torch.long)), ddfp_stream)
    ((features, mask, rng, got),) = recorder.calls
    assert mask.all()

    def direction(aux):
        torch.set_rng_state(rng)
        if aux:
            with perturbed_bn(model.head):
                return ddfp(features, head=model.head, mask=mask)
        return ddfp(features, head=model.head, mask=mask)

    through_aux, through_main = direction(aux=True), direction(aux=False)
    assert torch.allclose(got, through_aux, atol=1e-5)
    cosine = torch.cosine_similarity(
        (got - features).flatten(), (through_main - features).flatten(), dim=0
    )
    assert cosine < 0.99, "the main and auxiliary BatchNorm must give different directions here"


def expected_total(row, ddfp_weight=0.5):
    """The documented loss of an iteration from its logged stream losses."""
    value = {k: float(row[f"loss_{k}"]) if row.get(f"loss_{k}") else 0.0 for k in LOSS_STREAMS}
    weighted = (
        value["x"]
        + 0.25 * value["s1"]
        + 0.25 * value["s2"]
        + 0.5 * value["fp"]
        + ddfp_weight * value["ddfp"]
    )
    return weighted / (2.0 if row.get("loss_fp") or row.get("loss_ddfp") else 1.5)


LOSS_STREAMS = ("x", "s1", "s2", "fp", "ddfp")


@pytest.mark.parametrize(
    "fp,extra,normaliser",
    [
        ("none", [], 1.5),
        ("dropout", [], 2.0),
        ("ddfp", [], 2.0),
        ("both", [], 2.0),
        ("both", ["--ddfp-weight", "2.0"], 2.0),
    ],
)
def test_total_loss_keeps_unimatch_weights_and_divides_by_two_with_any_fp_stream(
    tiny_voc_root, tmp_path, fp, extra, normaliser
):
    module = load_script()
    module.main(tiny_args(tiny_voc_root, tmp_path, "--fp", fp, "--log-every", "1", *extra))
    weights = {"x": 1.0, "s1": 0.25, "s2": 0.25, "fp": 0.5}
    weights["ddfp"] = float(extra[1]) if extra else 0.5
    for row in read_log(tmp_path):
        streams = [k for k in LOSS_STREAMS if row.get(f"loss_{k}")]
        assert ("fp" in streams) == (fp in ("dropout", "both"))
        assert ("ddfp" in streams) == (fp in ("ddfp", "both"))
        weighted = sum(weights[k] * float(row[f"loss_{k}"]) for k in streams)
        total = float(row["loss"])
        assert total == pytest.approx(weighted / normaliser, rel=1e-5)
        assert total == pytest.approx(expected_total(row, weights["ddfp"]), rel=1e-5)
        if fp != "both":
            # What the loop computed before the DDFP weight was explicit: weights over their sum.
            assert total == pytest.approx(weighted / sum(weights[k] for k in streams), rel=1e-5)


def test_flow_burn_in_trains_the_flow_before_the_ddfp_stream_starts(tiny_voc_root, tmp_path):
    module = load_script()
    args = tiny_args(tiny_voc_root, tmp_path, "--log-every", "1", "--fp", "ddfp")
    args[args.index("--epochs") + 1] = "2"
    initial = FlowDensityEstimator(256, 21, seed=0).state_dict()
    summary = module.main([*args, "--flow-burn-in", "1", "--stop-after", "2"])
    assert summary["iterations"] == 2
    rows = read_log(tmp_path)
    for row in rows:
        assert row["flow_nll"] != "" and row["loss_s1"] != "" and row.get("loss_ddfp", "") == ""
        assert float(row["loss"]) == pytest.approx(expected_total(row), rel=1e-5)
    flow = torch.load(tmp_path / "latest.pt", weights_only=False)["flow"]
    assert any(not torch.equal(flow[k], initial[k]) for k in initial), "the flow must train"
    module.main([*args, "--flow-burn-in", "1", "--resume"])
    rows = read_log(tmp_path)
    assert [row["epoch"] for row in rows] == ["0", "0", "1", "1"]
    assert all(row["loss_ddfp"] != "" for row in rows[2:])


@pytest.mark.parametrize(
    "extra",
    [
        ["--fp", "dropout", "--flow-burn-in", "1"],
        ["--fp", "ddfp", "--flow-burn-in", "1"],
        ["--fp", "ddfp", "--epochs", "3", "--warmup-epochs", "1", "--flow-burn-in", "2"],
        ["--flow-burn-in", "-1"],
        ["--ddfp-min-grad-ratio", "-0.5"],
        ["--head-dropout", "1.0"],
        ["--ddfp-head-mode", "eval"],
    ],
)
def test_bad_stream_schedules_and_ddfp_options_are_rejected(tiny_voc_root, tmp_path, extra):
    with pytest.raises(SystemExit):
        load_script().parse_args(tiny_args(tiny_voc_root, tmp_path, *extra))


def test_ddfp_direction_and_head_dropout_flags_reach_the_perturbation_and_the_model(
    tiny_voc_root, tmp_path
):
    module = load_script()
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    extra = ["--ddfp-head-mode", "running_stats", "--ddfp-min-grad-ratio", "0.2"]
    args = module.parse_args(tiny_args(tiny_voc_root, tmp_path, *extra, "--head-dropout", "0"))
    model = module.build_model(args, 21, ctx)
    assert [m.p for m in model.head.modules() if isinstance(m, torch.nn.Dropout2d)] == [0.0, 0.0]
    state = module.build_training_state(args, model, DATASETS["voc"], 4, ctx.device)
    ddfp = state.ddfp.perturbation
    assert (ddfp.head_mode, ddfp.min_grad_ratio, ddfp.eps) == ("running_stats", 0.2, 4.0)
    defaults = module.parse_args(tiny_args(tiny_voc_root, tmp_path))
    assert (defaults.ddfp_head_mode, defaults.ddfp_min_grad_ratio) == ("as_is", 0.0)
    assert (defaults.head_dropout, defaults.ddfp_weight, defaults.flow_burn_in) == (0.1, 0.5, 0)


def test_drawn_splits_never_hold_a_validation_image_from_the_same_folders(tiny_voc_root, tmp_path):
    module = load_script()
    from ddfp_examples.loaders import dataset_lines

    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    val_images = {line.split()[0] for line in (tiny_voc_root / "val.txt").read_text().splitlines()}
    # The validation images have masks and sit in JPEGImages/SegmentationClass with the rest.
    assert all((tiny_voc_root / image).is_file() for image in val_images) and len(val_images) == 3
    for seed in range(5):
        args = module.parse_args(
            ["--dataset", "voc", "--data-root", str(tiny_voc_root), "--num-labeled", "3",
             "--val-list", str(tiny_voc_root / "val.txt"), "--seed", str(seed),
             "--out", str(tmp_path)]
        )  # fmt: skip
        _, labeled, unlabeled, val_lines = dataset_lines(args, ctx)
        drawn = {line.split()[0] for line in labeled + unlabeled}
        assert len(labeled) == 3 and len(drawn) == 12 - 3
        assert not drawn & val_images


@pytest.mark.parametrize("overlapping", ["--labeled-list", "--unlabeled-list"])
def test_given_split_that_overlaps_the_validation_list_is_a_clear_error(
    tiny_voc_root, tmp_path, overlapping
):
    module = load_script()
    val_line = (tiny_voc_root / "val.txt").read_text().split("\n")[1]
    args = tiny_args(tiny_voc_root, tmp_path / "run")
    given = Path(args[args.index(overlapping) + 1])
    # The same image written as a bare VOC id still counts as the validation image.
    bare_id = Path(val_line.split()[0]).stem
    (tmp_path / "with_val.txt").write_text(given.read_text() + bare_id + "\n")
    args[args.index(overlapping) + 1] = str(tmp_path / "with_val.txt")
    with pytest.raises(ValueError, match=f"{overlapping}.*shares 1 image.*{bare_id}"):
        module.main(args)


# Own datasets ----------------------------------------------------------------------------------


def load_shapes_script():
    import importlib.util

    path = ROOT / "examples" / "make_shapes_dataset.py"
    spec = importlib.util.spec_from_file_location("make_shapes_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUICK = ["--epochs", "1", "--iters-per-epoch", "2", "--workers", "0", "--no-progress"]


def test_custom_three_class_run_reports_the_given_names_and_uses_every_dataset_flag(
    tmp_path, capsys, monkeypatch
):
    names = ["sky", "box", "ball"]
    root = load_shapes_script().make_shapes_dataset(
        tmp_path / "shapes", 3, num_images=12, num_val=4, size=(40, 48), ignore_index=254
    )
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    module = load_script()
    import ddfp_examples.metrics as metrics

    modes = []
    evaluate = metrics.evaluate

    def recording_evaluate(*args, **kwargs):
        modes.append(kwargs["mode"])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(metrics, "evaluate", recording_evaluate)
    out = tmp_path / "run"
    argv = [
        "--dataset", "custom", "--data-root", str(root), "--class-names", str(tmp_path / "names.txt"),
        "--ignore-index", "254", "--no-hflip", "--eval-mode", "sliding", "--val-list",
        str(root / "val.txt"), "--num-labeled", "4", "--crop-size", "32", "--backbone",
        "mobilenet_v2", "--batch-size", "2", "--threshold", "0.0", "--out", str(out), *QUICK,
    ]  # fmt: skip
    summary = module.main(argv)
    assert list(summary["final_iou_per_class"]) == names
    assert all(v is None or 0.0 <= v <= 1.0 for v in summary["final_iou_per_class"].values())
    assert modes == ["sliding"]
    table = capsys.readouterr().out
    assert all(name in table for name in names)
    recorded = json.loads((out / "args.json").read_text())
    assert (recorded["num_classes"], recorded["class_names"], recorded["ignore_index"]) == (
        3,
        names,
        254,
    )
    assert recorded["hflip"] is False and recorded["eval_mode"] == "sliding"
    args = module.parse_args(argv)
    loaders, val_loader, sizes = module.build_loaders(
        args, DistributedContext(0, 1, 0, torch.device("cpu"))
    )
    assert sizes == {"labeled": 4, "unlabeled": 4, "val": 4}
    for dataset in (loaders["x"].dataset.dataset, loaders["u"].dataset.dataset):
        assert dataset.hflip is False and dataset.ignore_index == 254
    # The 254 borders of the masks read as 255, the ignore label of the loss and the metric.
    _, mask, _ = val_loader.dataset.dataset[0]
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255} and (mask == 255).any()
    from importlib import util

    spec = util.spec_from_file_location("predict", ROOT / "examples" / "predict.py")
    predict = util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    trained = predict.load_trained_model(out / "best.pt")
    assert trained.model.classifier.out_channels == 3 and list(trained.spec.class_names) == names


def test_custom_masks_with_a_label_beyond_the_classes_are_a_clear_error(tmp_path):
    import numpy as np
    from PIL import Image

    root = load_shapes_script().make_shapes_dataset(
        tmp_path / "shapes", 3, num_images=8, num_val=2, size=(40, 48)
    )
    for path in (root / "SegmentationClass").glob("*.png"):
        labels = np.array(Image.open(path))
        labels[0, 0] = 3
        Image.fromarray(labels).save(path)
    argv = [
        "--dataset", "custom", "--data-root", str(root), "--num-classes", "3", "--val-list",
        str(root / "val.txt"), "--num-labeled", "2", "--crop-size", "32", "--backbone",
        "mobilenet_v2", "--batch-size", "2", "--out", str(tmp_path / "run"), *QUICK,
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"labels \[3\] out of range for 3 classes"):
        load_script().main(argv)


def test_custom_dataset_without_classes_or_with_a_class_ignore_value_is_a_usage_error(tmp_path):
    module = load_script()
    base = ["--dataset", "custom", "--data-root", str(tmp_path), "--num-labeled", "2"]
    with pytest.raises(SystemExit):
        module.parse_args(base)
    with pytest.raises(SystemExit):
        module.parse_args([*base, "--num-classes", "3", "--ignore-index", "1"])
    assert module.parse_args([*base, "--class-names", "a", "b"]).num_classes == 2


def shell_commands(page, marker):
    """The commands of the bash blocks of ``page`` that mention ``marker``, split like a shell."""
    import re
    import shlex

    text = (ROOT / "docs" / page).read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if marker in b]
    assert blocks, f"no bash block of {page} mentions {marker}"
    return [shlex.split(line) for line in blocks[0].replace("\\\n", " ").splitlines() if line]


@pytest.mark.parametrize("page", ["getting-started.md", "faq.md"])
def test_own_classes_example_of_the_docs_runs_and_reports_the_generated_class_names(
    page, tmp_path, monkeypatch
):
    make, train = shell_commands(page, "make_shapes_dataset.py")
    assert make[:2] == ["python", "examples/make_shapes_dataset.py"]
    assert train[:2] == ["python", "examples/voc_unimatch_plus_ddfp.py"]
    monkeypatch.chdir(tmp_path)
    root = load_shapes_script().main(make[2:])
    summary = load_script().main(train[2:] + QUICK)
    names = (root / "classes.txt").read_text().split()
    assert list(summary["final_iou_per_class"]) == names == ["background", "rectangle", "disc"]
    assert summary["iterations"] == 2


def test_recipe_fills_every_unset_option_and_a_given_flag_wins(tiny_voc_root, tmp_path):
    from dataclasses import fields

    from ddfp_examples.recipes import RECIPES

    module = load_script()
    voc = ["--dataset", "voc", "--data-root", str(tiny_voc_root), "--num-labeled", "4"]
    voc += ["--val-list", str(tiny_voc_root / "val.txt")]
    cases = (
        (["--dataset", "demo"], "demo"),
        (voc, "paper"),
        ([*voc, "--recipe", "demo"], "demo"),
    )
    for argv, name in cases:
        args = module.parse_args(argv)
        assert args.recipe == name
        for field in fields(RECIPES[name]):
            expected = getattr(RECIPES[name], field.name)
            if expected is None:
                continue
            got = getattr(args, field.name)
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == expected, field.name
    assert module.parse_args(voc).crop_size == 321, "the paper recipe keeps the dataset's crop"
    given = module.parse_args([*voc, "--recipe", "demo", "--lr", "0.02", "--threshold", "0.5"])
    assert (given.lr, given.threshold, given.optimizer) == (0.02, 0.5, "adamw")
    assert module.parse_args(["--dataset", "demo", "--backbone", "auto"]).backbone == "mobilenet_v2"
    assert module.parse_args(["--dataset", "demo", "--epochs", "1"]).warmup_epochs == 0
    with pytest.raises(SystemExit):
        module.parse_args(["--dataset", "demo", "--epochs", "1", "--warmup-epochs", "1"])


def test_decoder_width_and_stride_flags_reach_the_model_and_the_rebuilt_checkpoint(
    tiny_voc_root, tmp_path
):
    sys.path.insert(0, str(ROOT / "examples"))
    from predict import load_trained_model

    module = load_script()
    flags = ["--fp", "ddfp", "--head-channels", "32", "--low-reduced", "16"]
    flags += ["--output-stride", "16", "--flow-hidden", "24", "--optimizer", "adamw"]
    module.main(tiny_args(tiny_voc_root, tmp_path, *flags, "--lr-warmup-iters", "1"))
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=False)
    assert checkpoint["model"]["classifier.weight"].shape[1] == 32
    assert checkpoint["model"]["head.0.weight"].shape[1] == 16 + 32
    assert checkpoint["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    trained = load_trained_model(tmp_path / "latest.pt")
    assert trained.model.backbone.output_stride == 16
    assert trained.model.classifier.in_channels == 32
    widths = {m.out_features for m in trained.estimator.modules() if isinstance(m, torch.nn.Linear)}
    assert 24 in widths and 256 not in widths


def test_warmup_iterations_ramp_the_learning_rate_then_decay_it(tiny_voc_root, tmp_path):
    module = load_script()
    args = module.parse_args(tiny_args(tiny_voc_root, tmp_path, "--lr-warmup-iters", "3"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    rates = [module.set_poly_lr(optimizer, args, i, 10) for i in range(10)]
    assert rates[:3] == pytest.approx([args.lr * k / 4 for k in (1, 2, 3)])
    assert rates[3] == pytest.approx(args.lr)
    assert rates[4:] == pytest.approx([args.lr * (1 - k / 7) ** 0.9 for k in range(1, 7)])
    assert optimizer.param_groups[1]["lr"] == pytest.approx(rates[-1] * args.head_lr_mult)


# Training habits: accumulation, mean teacher, multi-scale evaluation ----------------------------


def _without_batchnorm(model):
    for name, child in model.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(model, name, torch.nn.Identity())
        else:
            _without_batchnorm(child)
    return model


def _halves(batch):
    return [
        tuple(tuple(t[half] for t in part) for part in batch) for half in (slice(0, 2), slice(2, 4))
    ]


@pytest.mark.parametrize("fp", ["none", "ddfp"])
def test_accumulating_two_half_batches_takes_the_step_of_the_whole_batch(tiny_voc_root, fp):
    from benchmarks.train_step import synthetic_batch

    module = load_script()
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    flags = ["--fp", fp, "--optimizer", "sgd", "--lr", "0.05", "--head-dropout", "0"]
    args = module.parse_args(tiny_args(tiny_voc_root, Path("unused"), *flags))
    batch = synthetic_batch(4, 32, torch.device("cpu"), seed=1)
    weights = {}
    for name, batches in (("whole", [batch]), ("accumulated", _halves(batch))):
        torch.manual_seed(0)
        model = _without_batchnorm(module.build_model(args, 21, ctx))
        streams = module.UniMatchDDFP(model, args.fp, False, args.threshold)
        state = module.build_training_state(args, model, DATASETS["voc"], 4, ctx.device)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        logged = module.train_step(streams, batches, state, args, ctx.device)
        assert torch.isfinite(logged["loss"])
        weights[name] = model.state_dict()
    moved = 0
    for key, value in weights["whole"].items():
        torch.testing.assert_close(weights["accumulated"][key], value, rtol=1e-4, atol=1e-6)
        moved += not torch.equal(value, before[key])
    assert moved > 0, "the step must move the weights"


def test_accumulate_counts_one_iteration_per_optimiser_step(tiny_voc_root, tmp_path):
    module = load_script()
    args = tiny_args(tiny_voc_root, tmp_path, "--fp", "ddfp", "--log-every", "1")
    args[args.index("--iters-per-epoch") + 1] = "10"
    plain = module.main([*args, "--out", str(tmp_path / "plain")])
    accumulated = module.main([*args, "--accumulate", "2", "--out", str(tmp_path / "acc")])
    # 6 unlabelled images in batches of 2: 3 batches an epoch, one step of 2 of them.
    assert (plain["iterations"], accumulated["iterations"]) == (3, 1)
    with pytest.raises(SystemExit):
        module.parse_args([*args, "--accumulate", "0"])


def test_mean_teacher_supplies_pseudo_labels_and_resumes_exactly(tiny_voc_root, tmp_path):
    module = load_script()
    common = ["--fp", "ddfp", "--epochs", "2", "--seed", "3", "--ema", "--ema-decay", "0.9"]
    straight = module.main(tiny_args(tiny_voc_root, tmp_path / "straight", *common))
    assert "teacher mIoU" in straight["final_scores"]
    module.main(tiny_args(tiny_voc_root, tmp_path / "split", *common, "--stop-after", "3"))
    module.main(tiny_args(tiny_voc_root, tmp_path / "split", *common, "--resume"))
    a = torch.load(tmp_path / "straight" / "latest.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "latest.pt", weights_only=False)
    assert a["teacher"]["steps"] == b["teacher"]["steps"] == 4
    for part, key in [("model", k) for k in a["model"]] + [
        ("teacher", k) for k in a["teacher"]["model"]
    ]:
        left = a[part][key] if part == "model" else a["teacher"]["model"][key]
        right = b[part][key] if part == "model" else b["teacher"]["model"][key]
        assert torch.allclose(left.float(), right.float(), atol=1e-6), f"{part}.{key}"
    # The teacher is an average of the model's weights, not the model itself.
    differs = [
        k
        for k, v in a["teacher"]["model"].items()
        if v.is_floating_point() and not torch.equal(v, a["model"][k])
    ]
    assert differs


def test_mean_teacher_update_is_the_running_mean_then_the_ema():
    from ddfp_examples.training_state import MeanTeacher

    student = torch.nn.Linear(3, 2)
    teacher = MeanTeacher(student, decay=0.6)
    teacher.start(student)
    history = []
    for _ in range(5):
        with torch.no_grad():
            student.weight.add_(torch.randn_like(student.weight))
        history.append(student.weight.detach().clone())
        teacher.update(student)
    # Decays 0, 1/2, 2/3 -> capped at 0.6 from the third update on.
    expected = history[0]
    for step, weight in enumerate(history[1:], start=1):
        decay = min(1 - 1 / (step + 1), 0.6)
        expected = decay * expected + (1 - decay) * weight
    torch.testing.assert_close(teacher.model.weight, expected)
    assert not teacher.model.weight.requires_grad


def test_eval_scales_and_flip_reach_the_evaluation(tiny_voc_root, tmp_path, monkeypatch):
    module = load_script()
    import ddfp_examples.metrics as metrics

    seen = []
    real = metrics.evaluate

    def recording(*args, **kw):
        seen.append((tuple(kw["scales"]), kw["flip"]))
        return real(*args, **kw)

    monkeypatch.setattr(metrics, "evaluate", recording)
    module.main(
        tiny_args(tiny_voc_root, tmp_path, "--eval-scales", "0.75", "1.0", "1.25", "--eval-flip")
    )
    assert seen == [((0.75, 1.0, 1.25), True)]
    with pytest.raises(SystemExit):
        module.parse_args(tiny_args(tiny_voc_root, tmp_path, "--eval-scales", "0"))


@pytest.mark.parametrize("cores,workers", [(1, 0), (2, 0), (4, 2), (16, 2)])
def test_default_workers_leave_a_two_core_machine_to_the_training_threads(
    tiny_voc_root, tmp_path, monkeypatch, cores, workers
):
    module = load_script()
    args = tiny_args(tiny_voc_root, tmp_path)
    del args[args.index("--workers") : args.index("--workers") + 2]
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert module.parse_args(args).workers == workers
    assert module.parse_args([*args, "--workers", "3"]).workers == 3
