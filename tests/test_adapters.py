"""One DDFP training step end to end on our DeepLabV3+ and on smp's, through the same loop code."""

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


def one_ddfp_step(model, size=32, num_classes=3):
    """A labelled CE + DDFP consistency step with auxiliary BN, then a flow update.

    Returns the loss, the perturbed-branch gradient of every parameter outside the head's main BN
    branch (None where it gets none), that gradient for the main BN parameters, and the flow
    weights before and after the flow step.
    """
    torch.manual_seed(0)
    model.train()
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
    with perturbed_bn(model.head):
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


def check_step(loss, path_grads, main_bn_grads, before, after):
    assert torch.isfinite(loss)
    missing = [n for n, g in path_grads.items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"parameters of the perturbed path without gradient: {missing}"
    assert main_bn_grads and all(g is None for g in main_bn_grads)
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


def test_importing_the_adapters_does_not_import_smp():
    code = "import sys, ddfp_lib.adapters; print('segmentation_models_pytorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.smp
def test_smp_adapter_docstring_example_runs():
    pytest.importorskip("segmentation_models_pytorch")
    from ddfp_lib.adapters import smp as smp_adapter

    result = doctest.testmod(smp_adapter)
    assert result.attempted > 0 and result.failed == 0
