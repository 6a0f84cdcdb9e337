"""One DDFP training step end to end on our DeepLabV3+, on smp's DeepLabV3+, FPN and UPerNet and on
transformers' SegFormer, through the same loop code; each adapter against its model's own forward."""

import contextlib
import doctest
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddfp_lib import (
    ConsistencyLoss,
    DensityDescendingPerturbation,
    DualBatchNorm2d,
    FlowDensityEstimator,
    OnlineFlowTrainer,
    convert_to_dual_bn,
    perturbed_bn,
)

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))


def one_ddfp_step(model, size=32, num_classes=3, aux_bn=True):
    """A labelled CE + DDFP consistency step (with auxiliary BN unless ``aux_bn`` is False, for
    heads without BatchNorm), then a flow update.

    Returns the loss, the perturbed-branch gradient of every parameter outside the head's main BN
    branch (None where it gets none), that gradient for the main BN parameters, and the flow
    weights before and after the flow step.
    """
    torch.manual_seed(0)
    model.train()
    if aux_bn:
        convert_to_dual_bn(model.head)
    consistency = ConsistencyLoss(threshold=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, num_classes, (2, size, size))
    u = torch.randn(2, 3, size, size)

    v = model.decoder_input(*model.encode(torch.cat([x, u])))
    h = model.head(v)
    estimator = FlowDensityEstimator(h.shape[1], num_classes, hidden_dim=16, seed=0)
    flow_trainer = OnlineFlowTrainer(estimator)
    ddfp = DensityDescendingPerturbation(estimator, eps=4.0)
    logits_x, logits_u = model.upsample(model.classifier(h), x.shape[-2:]).split([2, 2])
    confident_mask = torch.rand(2, *v.shape[-2:]) > 0.3
    with perturbed_bn(model.head) if aux_bn else contextlib.nullcontext():
        v_ddfp = ddfp(v[2:], head=model.head, mask=confident_mask)
        logits_ddfp = model.upsample(model.classifier(model.head(v_ddfp)), u.shape[-2:])
    loss_ddfp = consistency(logits_ddfp, logits_u.detach())
    loss = F.cross_entropy(logits_x, y) + 0.5 * loss_ddfp

    main_bn = {
        id(p)
        for m in model.head.modules()
        if isinstance(m, DualBatchNorm2d)
        for p in m.main.parameters()
    }
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        loss_ddfp, [p for _, p in named], retain_graph=True, allow_unused=True
    )
    path = {n: g for (n, p), g in zip(named, grads) if id(p) not in main_bn}
    main = [g for (_, p), g in zip(named, grads) if id(p) in main_bn]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    before = [p.detach().clone() for p in estimator.parameters()]
    flow_trainer.step([h[:2], h[2:]], [y, None])
    after = [p.detach().clone() for p in estimator.parameters()]
    return loss.detach(), path, main, before, after


def check_step(loss, path_grads, main_bn_grads, before, after, aux_bn=True):
    assert torch.isfinite(loss)
    missing = [n for n, g in path_grads.items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"parameters of the perturbed path without gradient: {missing}"
    assert bool(main_bn_grads) == aux_bn and all(g is None for g in main_bn_grads)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.slow
def test_our_deeplabv3plus_takes_one_ddfp_step_with_gradients_everywhere_on_the_perturbed_path():
    models = pytest.importorskip("ddfp_examples.models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = models.build_deeplabv3plus("mobilenet_v2", num_classes=3, backbone_weights=None)
    check_step(*one_ddfp_step(model))


@pytest.mark.smp
def test_smp_adapter_forward_equals_smp_forward():
    smp = pytest.importorskip("segmentation_models_pytorch")
    from ddfp_lib.adapters import SMPDeepLabV3Plus

    torch.manual_seed(0)
    net = smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=3).eval()
    adapter = SMPDeepLabV3Plus(net).eval()
    x = torch.randn(2, 3, 64, 48)
    out = adapter.forward_features(x)
    assert torch.allclose(out.logits, net(x), atol=1e-5)
    assert out.v.shape == (2, 304, 16, 12) and out.h.shape == (2, 256, 16, 12)
    assert torch.allclose(
        adapter.upsample(adapter.decode(out.v), x.shape[-2:]), out.logits, atol=1e-5
    )
    assert {n for n, _ in adapter.named_parameters()} == {
        f"model.{n}" for n, _ in net.named_parameters()
    }


@pytest.mark.smp
def test_smp_adapter_takes_one_ddfp_step_with_gradients_everywhere_on_the_perturbed_path():
    smp = pytest.importorskip("segmentation_models_pytorch")
    from ddfp_lib.adapters import SMPDeepLabV3Plus

    adapter = SMPDeepLabV3Plus(smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=3))
    check_step(*one_ddfp_step(adapter))


@pytest.mark.smp
def test_smp_adapter_rejects_other_models_and_output_activations():
    smp = pytest.importorskip("segmentation_models_pytorch")
    from ddfp_lib.adapters import SMPDeepLabV3Plus, build_smp_deeplabv3plus

    with pytest.raises(ValueError, match="DeepLabV3Plus"):
        SMPDeepLabV3Plus(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="activation=None"):
        SMPDeepLabV3Plus(
            smp.DeepLabV3Plus("resnet18", encoder_weights=None, activation="softmax2d")
        )
    adapter = build_smp_deeplabv3plus("resnet18", num_classes=4, encoder_weights=None)
    assert adapter.num_classes == 4 and adapter.decoder_channels == 304
    with pytest.raises(ValueError, match=r"v must be \(B, 304"):
        adapter.decode(torch.randn(1, 256, 4, 4))


@pytest.mark.smp
def test_our_deeplabv3plus_and_the_smp_adapter_are_structural_segmenters():
    pytest.importorskip("segmentation_models_pytorch")
    models = pytest.importorskip("ddfp_examples.models")
    from ddfp_lib.adapters import Segmenter, SegmenterOutput, build_smp_deeplabv3plus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = models.build_deeplabv3plus("mobilenet_v2", num_classes=3, backbone_weights=None)
    adapter = build_smp_deeplabv3plus("resnet18", num_classes=3, encoder_weights=None)
    for model in (ours, adapter):
        assert isinstance(model, Segmenter)
        out = model.eval().forward_features(torch.zeros(1, 3, 32, 32))
        assert type(out) is SegmenterOutput and out.logits.shape == (1, 3, 32, 32)
    assert not isinstance(torch.nn.Conv2d(3, 3, 1), Segmenter)


def test_importing_the_adapters_imports_neither_smp_nor_transformers():
    code = (
        "import sys, ddfp_lib.adapters; "
        "print('segmentation_models_pytorch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.smp
def test_smp_adapter_docstring_example_runs():
    pytest.importorskip("segmentation_models_pytorch")
    from ddfp_lib.adapters import smp as smp_adapter

    result = doctest.testmod(smp_adapter)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------ smp FPN / UPerNet / DeepLabV3+ with a timm encoder
TIMM_ENCODER = "tu-resnet18"
SMP_DECODERS = ["DeepLabV3Plus", "FPN", "FPN-cat", "UPerNet"]


def tiny_smp_adapter(name):
    """A randomly initialised smp model with a timm encoder and 32-channel decoder, its adapter,
    and the channels of ``v`` and ``h``."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    from ddfp_lib.adapters import SMPFPN, SMPDeepLabV3Plus, SMPUPerNet

    # timm zero-initialises the last BatchNorm of every residual block, which would leave the
    # block's other layers without gradient at initialisation.
    common = {"encoder_weights": None, "classes": 3, "zero_init_last": False}
    if name == "DeepLabV3Plus":
        net = smp.DeepLabV3Plus(TIMM_ENCODER, decoder_channels=32, **common)
        return net, SMPDeepLabV3Plus(net), 32 + 48, 32
    if name == "UPerNet":
        net = smp.UPerNet(TIMM_ENCODER, decoder_channels=32, **common)
        return net, SMPUPerNet(net), 4 * 32, 32
    policy = "cat" if name == "FPN-cat" else "add"
    net = smp.FPN(
        TIMM_ENCODER,
        decoder_pyramid_channels=32,
        decoder_segmentation_channels=32,
        decoder_merge_policy=policy,
        **common,
    )
    width = 4 * 32 if policy == "cat" else 32
    return net, SMPFPN(net), width, width


def assert_adapter_reproduces(adapter, reference, x, v_channels, h_channels):
    """``adapter`` against ``reference(x)`` (the wrapped model's own logits at input resolution)
    in eval mode, then in training mode with the same random draws (dropout, drop path)."""
    from ddfp_lib.adapters import Segmenter, SegmenterOutput

    assert isinstance(adapter, Segmenter)
    adapter.eval()
    with torch.no_grad():
        out = adapter.forward_features(x)
        assert type(out) is SegmenterOutput
        assert torch.allclose(out.logits, reference(x), atol=1e-5)
        assert torch.allclose(adapter(x), out.logits, atol=1e-5)
        decoded = adapter.upsample(adapter.decode(out.v), x.shape[-2:])
        assert torch.allclose(decoded, out.logits, atol=1e-5)
    stride_4 = (x.shape[0], x.shape[-2] // 4, x.shape[-1] // 4)
    assert out.v.shape == (stride_4[0], v_channels, *stride_4[1:])
    assert out.h.shape == (stride_4[0], h_channels, *stride_4[1:])
    assert torch.equal(out.h, adapter.head(out.v))
    adapter.train()
    with torch.no_grad():
        torch.manual_seed(1)
        expected = reference(x)
        torch.manual_seed(1)
        assert torch.allclose(adapter(x), expected, atol=1e-5)


@pytest.mark.smp
@pytest.mark.parametrize("name", SMP_DECODERS)
def test_timm_encoder_smp_adapter_reproduces_the_wrapped_forward(name):
    torch.manual_seed(0)
    net, adapter, v_channels, h_channels = tiny_smp_adapter(name)
    assert_adapter_reproduces(adapter, net, torch.randn(2, 3, 64, 96), v_channels, h_channels)
    assert adapter.decoder_channels == v_channels and adapter.num_classes == 3
    assert {n for n, _ in adapter.named_parameters()} == {
        f"model.{n}" for n, _ in net.named_parameters()
    }


@pytest.mark.smp
@pytest.mark.parametrize("name", SMP_DECODERS)
def test_timm_encoder_smp_adapter_takes_one_ddfp_step_with_gradients_on_the_perturbed_path(name):
    _, adapter, _, _ = tiny_smp_adapter(name)
    has_batchnorm = not name.startswith("FPN")  # FPN's head is a Dropout2d
    check_step(*one_ddfp_step(adapter, size=64, aux_bn=has_batchnorm), aux_bn=has_batchnorm)


@pytest.mark.smp
def test_fpn_adapter_head_leaves_v_intact_in_training_mode():
    _, adapter, _, _ = tiny_smp_adapter("FPN")
    v = torch.randn(2, 32, 8, 8)
    before = v.clone()
    h = adapter.train().head(v)
    assert torch.equal(v, before) and not torch.equal(h, v)


@pytest.mark.smp
def test_smp_adapters_reject_other_architectures_and_wrong_inputs():
    smp = pytest.importorskip("segmentation_models_pytorch")
    from ddfp_lib.adapters import SMPFPN, SMPUPerNet

    upernet = smp.UPerNet(TIMM_ENCODER, encoder_weights=None, classes=3, decoder_channels=32)
    with pytest.raises(ValueError, match="segmentation_models_pytorch.FPN, got UPerNet"):
        SMPFPN(upernet)
    with pytest.raises(ValueError, match="activation=None"):
        SMPUPerNet(smp.UPerNet(TIMM_ENCODER, encoder_weights=None, activation="sigmoid"))
    adapter = SMPUPerNet(upernet)
    with pytest.raises(ValueError, match="UPerNet decodes 4 stages, got 2"):
        adapter.decoder_input(torch.randn(1, 64, 8, 8), torch.randn(1, 128, 4, 4))
    with pytest.raises(ValueError, match=r"v must be \(B, 128"):
        adapter.decode(torch.randn(1, 32, 8, 8))
    with pytest.raises(RuntimeError, match="divisible by 32"):
        adapter.encode(torch.randn(1, 3, 48, 48))


# ---------------------------------------------------------------- transformers' SegFormer
def tiny_segformer():
    """A randomly initialised SegFormer (stage widths 8/16/24/32, decoder 16, 3 classes)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
        num_labels=3,
    )
    return transformers.SegformerForSemanticSegmentation(config)


def segformer_logits(net, x):
    """The model's own logits (stride 4), resized to x as transformers does for its loss."""
    logits = net(pixel_values=x).logits
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.transformers
def test_segformer_adapter_reproduces_the_model_logits():
    from ddfp_lib.adapters import HFSegformer

    torch.manual_seed(0)
    net = tiny_segformer()
    adapter = HFSegformer(net)
    x = torch.randn(2, 3, 64, 96)
    assert_adapter_reproduces(adapter, lambda x: segformer_logits(net, x), x, 4 * 16, 16)
    adapter.eval()
    with torch.no_grad():
        v = adapter.decoder_input(*adapter.encode(x))
        assert torch.allclose(adapter.decode(v), net(pixel_values=x).logits, atol=1e-5)
    assert adapter.decoder_channels == 64 and adapter.num_classes == 3
    assert {n for n, _ in adapter.named_parameters()} == {
        f"model.{n}" for n, _ in net.named_parameters()
    }
    assert set(adapter.state_dict()) == {f"model.{k}" for k in net.state_dict()}


@pytest.mark.transformers
def test_segformer_adapter_takes_one_ddfp_step_with_aux_bn_in_the_decode_head():
    from ddfp_lib.adapters import HFSegformer

    net = tiny_segformer()
    adapter = HFSegformer(net)
    check_step(*one_ddfp_step(adapter, size=64))
    # The conversion reached the model's own decode head, so its forward uses the same layers.
    assert isinstance(net.decode_head.batch_norm, DualBatchNorm2d)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(adapter.eval()(x), segformer_logits(net.eval(), x), atol=1e-5)


@pytest.mark.transformers
def test_segformer_adapter_keeps_one_decode_head_through_deepcopy():
    import copy

    from ddfp_lib.adapters import HFSegformer

    teacher = copy.deepcopy(HFSegformer(tiny_segformer()))
    assert teacher.head.decode_head is teacher.model.decode_head


@pytest.mark.transformers
def test_segformer_adapter_rejects_other_models_and_wrong_inputs():
    transformers = pytest.importorskip("transformers")
    from ddfp_lib.adapters import HFSegformer

    with pytest.raises(ValueError, match="SegformerForSemanticSegmentation, got Conv2d"):
        HFSegformer(torch.nn.Conv2d(3, 3, 1))
    flat = transformers.SegformerConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
        reshape_last_stage=False,
    )
    with pytest.raises(ValueError, match="reshape_last_stage=True"):
        HFSegformer(transformers.SegformerForSemanticSegmentation(flat))
    adapter = HFSegformer(tiny_segformer())
    with pytest.raises(ValueError, match="SegFormer decodes 4 stages, got 1"):
        adapter.decoder_input(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"v must be \(B, 64"):
        adapter.decode(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="image batch"):
        adapter.encode(torch.randn(3, 32, 32))


@pytest.mark.transformers
def test_segformer_adapter_docstring_examples_run():
    pytest.importorskip("transformers")
    from ddfp_lib.adapters import segformer

    result = doctest.testmod(segformer)
    assert result.attempted > 0 and result.failed == 0
