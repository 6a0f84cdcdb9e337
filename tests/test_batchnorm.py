"""DualBatchNorm2d routing, statistics isolation, state-dict loading, and the converter."""

import copy
import doctest

import pytest
import torch
from torch import nn

from ddfp_lib import (
    DensityDescendingPerturbation,
    DualBatchNorm2d,
    FlowDensityEstimator,
    convert_to_dual_bn,
    perturbed_bn,
)
from ddfp_lib import batchnorm as batchnorm_module


def fuse_block(channels=6):
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        ),
    )


def buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_converter_wraps_every_batchnorm_keeps_weights_and_is_idempotent():
    block = fuse_block()
    original = copy.deepcopy(block)
    converted = convert_to_dual_bn(block)
    assert converted is block
    duals = [m for m in block.modules() if isinstance(m, DualBatchNorm2d)]
    assert len(duals) == 2
    assert torch.equal(block[1].main.weight, original[1].weight)
    assert block[1].main.weight.data_ptr() != block[1].aux.weight.data_ptr()
    convert_to_dual_bn(block)
    assert not isinstance(block[1].main, DualBatchNorm2d)
    bare = convert_to_dual_bn(nn.BatchNorm2d(3))
    assert isinstance(bare, DualBatchNorm2d)


def test_clean_passes_never_touch_aux_statistics_and_perturbed_passes_never_touch_main():
    torch.manual_seed(0)
    plain = fuse_block().train()
    dual = convert_to_dual_bn(copy.deepcopy(plain)).train()
    clean = torch.randn(4, 6, 5, 5)
    perturbed = torch.randn(4, 6, 5, 5) * 3 + 2
    aux_before = buffers(dual[1].aux)
    out = dual(clean)
    assert torch.allclose(out, plain(clean), atol=1e-6)
    assert same(aux_before, buffers(dual[1].aux))
    assert torch.allclose(dual[1].main.running_mean, plain[1].running_mean)
    main_before = buffers(dual[1].main)
    with perturbed_bn(dual):
        dual(perturbed)
    assert same(main_before, buffers(dual[1].main))
    reference = fuse_block().train()
    reference.load_state_dict(plain.state_dict())
    reference[1].running_mean.copy_(aux_before["running_mean"])
    reference[1].running_var.copy_(aux_before["running_var"])
    reference(perturbed)
    assert torch.allclose(dual[1].aux.running_mean, reference[1].running_mean, atol=1e-6)
    assert int(dual[1].aux.num_batches_tracked) == 1 and int(dual[1].main.num_batches_tracked) == 1


def test_each_branch_gets_gradients_only_from_its_own_passes():
    dual = convert_to_dual_bn(fuse_block()).train()
    dual(torch.randn(2, 6, 4, 4)).sum().backward()
    assert dual[1].main.weight.grad is not None and dual[1].aux.weight.grad is None
    dual.zero_grad(set_to_none=True)
    with perturbed_bn(dual):
        dual(torch.randn(2, 6, 4, 4)).sum().backward()
    assert dual[1].aux.weight.grad is not None and dual[1].main.weight.grad is None


def test_eval_mode_uses_the_main_branch_even_when_routed_to_aux():
    bn = DualBatchNorm2d(3)
    bn.aux.running_mean.fill_(5.0)
    bn.aux.weight.data.fill_(2.0)
    x = torch.randn(2, 3, 4, 4)
    bn.eval()
    with perturbed_bn(bn):
        routed = bn(x)
    assert torch.allclose(routed, bn.main(x))
    bn.train()
    with perturbed_bn(bn):
        training = bn(x)
    expected = (
        2.0
        * (x - x.mean((0, 2, 3), keepdim=True))
        / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + bn.aux.eps)
    )
    assert torch.allclose(training, expected, atol=1e-5)


def test_context_nests_and_restores_the_routing_after_an_exception():
    block = convert_to_dual_bn(fuse_block())
    layers = [m for m in block.modules() if isinstance(m, DualBatchNorm2d)]
    with perturbed_bn(block):
        with perturbed_bn(block[3]):
            assert all(layer.use_aux for layer in layers)
        assert all(layer.use_aux for layer in layers)
    assert not any(layer.use_aux for layer in layers)
    with pytest.raises(RuntimeError, match="boom"), perturbed_bn(block):
        raise RuntimeError("boom")
    assert not any(layer.use_aux for layer in layers)


def test_context_on_a_module_without_dual_layers_raises():
    with pytest.raises(ValueError, match="convert_to_dual_bn"):
        with perturbed_bn(fuse_block()):
            pass


def test_plain_batchnorm_state_dict_loads_strictly_and_aux_copies_main():
    torch.manual_seed(0)
    plain = fuse_block().train()
    for _ in range(3):
        plain(torch.randn(4, 6, 5, 5) + 1.0)
    state = plain.state_dict()
    dual = convert_to_dual_bn(fuse_block())
    dual.load_state_dict(state, strict=True)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(dual[1].main, name), state[f"1.{name}"]), name
        assert torch.equal(getattr(dual[1].aux, name), state[f"1.{name}"]), name
    assert torch.equal(dual[3][1].aux.running_var, state["3.1.running_var"])
    dual[1].aux.running_mean.add_(1.0)
    assert torch.equal(dual[1].main.running_mean, state["1.running_mean"])
    again = convert_to_dual_bn(fuse_block())
    again.load_state_dict(dual.state_dict(), strict=True)
    assert torch.equal(again[1].aux.running_mean, dual[1].aux.running_mean)
    assert not torch.equal(again[1].aux.running_mean, again[1].main.running_mean)


def test_sync_batchnorm_stays_sync_batchnorm_in_both_branches():
    plain = fuse_block()
    block = convert_to_dual_bn(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)))
    assert type(block[1].main) is nn.SyncBatchNorm and type(block[1].aux) is nn.SyncBatchNorm
    x = torch.randn(2, 6, 3, 3)
    assert torch.allclose(block.eval()(x), plain.eval()(x), atol=1e-6)
    main_before, aux_before = buffers(block[1].main), buffers(block[1].aux)
    block.train()
    with perturbed_bn(block):
        block(x)
    assert same(main_before, buffers(block[1].main))
    assert not torch.equal(aux_before["running_mean"], block[1].aux.running_mean)


def test_ddfp_through_a_dual_head_changes_neither_branch():
    torch.manual_seed(0)
    head = convert_to_dual_bn(fuse_block(8)).train()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    ddfp = DensityDescendingPerturbation(FlowDensityEstimator(8, 3, hidden_dim=16, seed=0))
    features = torch.randn(2, 8, 4, 4)
    with perturbed_bn(head):
        perturbed = ddfp(features, head=head)
    assert all(torch.equal(v, state[k]) for k, v in head.state_dict().items())
    assert torch.allclose((perturbed - features).norm(dim=1), torch.full((2, 4, 4), 4.0), atol=1e-4)


def test_docstring_examples_run():
    result = doctest.testmod(batchnorm_module)
    assert result.attempted > 0 and result.failed == 0
