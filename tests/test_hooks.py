"""perturb_output: the hooked output is the perturbation of the module's output, and the hook goes away."""

import doctest

import pytest
import torch
from torch import nn

from ddfp_lib import (
    DensityDescendingPerturbation,
    FlowDensityEstimator,
    RandomDirectionPerturbation,
    UniformNoisePerturbation,
    perturb_output,
)
from ddfp_lib import hooks as hooks_module


class ToySegmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.decoder = nn.Module()
        self.decoder.block = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.classifier(self.decoder.block(self.encoder(x)))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_hooked_forward_equals_the_perturbation_applied_by_hand():
    torch.manual_seed(0)
    model = ToySegmenter()
    x = torch.randn(2, 3, 5, 5)
    with perturb_output(model, "decoder.block", UniformNoisePerturbation(), generator=seeded(1)):
        hooked = model(x)
    by_hand = model.classifier(
        UniformNoisePerturbation()(model.decoder.block(model.encoder(x)), generator=seeded(1))
    )
    assert torch.equal(hooked, by_hand)
    assert not torch.allclose(hooked, model(x))


def test_ddfp_through_the_hook_with_head_and_mask_matches_the_direct_call():
    torch.manual_seed(0)
    model = ToySegmenter()
    est = FlowDensityEstimator(6, 2, hidden_dim=8, seed=0)
    ddfp = DensityDescendingPerturbation(est, eps=2.0)
    x = torch.randn(2, 3, 4, 4)
    mask = torch.rand(2, 4, 4) > 0.5
    head = model.decoder.block
    with perturb_output(model, "encoder", ddfp, head=head, mask=mask):
        hooked = model(x)
    v = model.encoder(x)
    expected = model.classifier(head(ddfp(v, head=head, mask=mask)))
    assert torch.allclose(hooked, expected, atol=1e-6)


def test_gradient_reaches_the_layers_before_the_hooked_module():
    model = ToySegmenter()
    with perturb_output(model, "encoder", RandomDirectionPerturbation(eps=1.0)):
        model(torch.randn(1, 3, 4, 4)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_hook_is_removed_on_exit_and_on_exception():
    model = ToySegmenter()
    x = torch.randn(1, 3, 4, 4)
    clean = model(x)
    with perturb_output(model, "decoder.block", RandomDirectionPerturbation()) as target:
        assert target is model.decoder.block and len(target._forward_hooks) == 1
    assert len(model.decoder.block._forward_hooks) == 0
    assert torch.equal(model(x), clean)
    with pytest.raises(RuntimeError, match="inside"):
        with perturb_output(model, "decoder.block", RandomDirectionPerturbation()):
            raise RuntimeError("inside")
    assert len(model.decoder.block._forward_hooks) == 0
    assert torch.equal(model(x), clean)


def test_unknown_module_name_lists_close_names():
    with pytest.raises(ValueError, match=r"no sub-module 'decoder.blok'.*decoder.block"):
        with perturb_output(ToySegmenter(), "decoder.blok", RandomDirectionPerturbation()):
            pass
    with pytest.raises(ValueError, match="top-level modules: encoder, decoder, classifier"):
        with perturb_output(ToySegmenter(), "zzzz", RandomDirectionPerturbation()):
            pass


def test_non_tensor_output_raises_a_value_error():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(Pair())
    with pytest.raises(ValueError, match="needs a tensor output"):
        with perturb_output(model, "0", RandomDirectionPerturbation()):
            model(torch.randn(1, 2, 2, 2))


def test_docstring_examples_run():
    result = doctest.testmod(hooks_module)
    assert result.attempted > 0 and result.failed == 0
