"""The python blocks of docs/integration.md run, in order, on a tiny toy segmenter."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC = DOCS / "integration.md"
NUM_CLASSES = 3


class ToySegmenter(nn.Module):
    """The DeepLabV3+ method names on a few convolutions: v has 12 channels, h 256."""

    def __init__(self):
        super().__init__()
        self.low = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.high = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Conv2d(12, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU())
        self.classifier = nn.Conv2d(256, NUM_CLASSES, 1)
        with torch.no_grad():
            self.classifier.weight.mul_(30.0)

    def encode(self, x):
        low = self.low(x)
        return low, self.high(low)

    def decoder_input(self, low, high):
        return torch.cat([low, F.interpolate(high, size=low.shape[-2:])], dim=1)

    def upsample(self, logits, size):
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def python_blocks(path=DOC):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def needs_transformers(block):
    return "from transformers" in block


def assert_trained_by_the_step(adapter, x, dim):
    """The step left a gradient on the adapter's classifier, and its ``h`` has the flow's width."""
    grad = adapter.classifier.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        h = adapter.eval().head(adapter.decoder_input(*adapter.encode(x)))
    assert h.shape == (len(x), dim, x.shape[-2] // 4, x.shape[-1] // 4)


def test_the_recipe_block_has_at_most_twenty_lines():
    recipe = python_blocks()[0]
    assert "def semi_supervised_step" in recipe
    assert len([line for line in recipe.splitlines() if line.strip()]) <= 20


@pytest.mark.slow
@pytest.mark.smp
def test_integration_recipes_run_and_train_model_and_flow():
    pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = ToySegmenter()
    x, u = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (2, 32, 32))
    with torch.no_grad():
        confidence = model.classifier(model.head(model.decoder_input(*model.encode(u)))).softmax(1)
    assert (confidence.amax(1) >= 0.95).float().mean() > 0.2
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    namespace = {
        "model": model,
        "x": x,
        "y": y,
        "u": u,
        "optimizer": optimizer,
        "num_classes": NUM_CLASSES,
        "total_steps": 10,
    }
    blocks = python_blocks()
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    classifier_before = model.classifier.weight.detach().clone()
    flow_before = [p.detach().clone() for p in namespace["estimator"].parameters()]
    namespace["semi_supervised_step"](model, x, y, u, optimizer)
    assert namespace["flow_trainer"].num_steps == 1
    assert not torch.equal(model.classifier.weight, classifier_before)
    assert torch.isfinite(model.classifier.weight).all()
    flow_after = list(namespace["estimator"].parameters())
    assert any(not torch.equal(b, a) for b, a in zip(flow_before, flow_after))
    later = [block for block in blocks[1:] if not needs_transformers(block)]
    for block in later:
        exec(compile(block, str(DOC), "exec"), namespace)
    steps = 1 + sum(block.count("semi_supervised_step(") for block in later)
    assert steps == 4 and namespace["flow_trainer"].num_steps == steps
    for name in ("smp_model", "upernet", "fpn"):
        assert_trained_by_the_step(namespace[name], x, namespace["estimator"].dim)
    assert namespace["logits_ddfp"].shape == (2, NUM_CLASSES, 8, 8)
    assert namespace["logits_fp"].shape == (2, NUM_CLASSES, 64, 64)
    assert not namespace["model"].head[1].aux.running_mean.equal(model.head[1].main.running_mean)


def test_perturbations_page_example_runs_every_perturbation_on_the_same_features():
    blocks = python_blocks(DOCS / "perturbations.md")
    namespace: dict = {}
    exec(compile(blocks[-1], "perturbations.md", "exec"), namespace)
    v, v_vat = namespace["v"], namespace["v_vat"]
    assert namespace["v_perturbed"].shape == v.shape
    assert torch.allclose((v_vat - v).flatten(1).norm(dim=1), torch.full((2,), 2.0), atol=1e-5)


@pytest.mark.slow
@pytest.mark.transformers
def test_segformer_recipe_trains_the_adapter_and_the_flow():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    x, u = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    namespace = {
        "x": x,
        "y": torch.randint(0, NUM_CLASSES, (2, 32, 32)),
        "u": u,
        "num_classes": NUM_CLASSES,
        "total_steps": 10,
    }
    blocks = python_blocks()
    (segformer_block,) = [block for block in blocks if needs_transformers(block)]
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    flow_before = [p.detach().clone() for p in namespace["estimator"].parameters()]
    exec(compile(segformer_block, str(DOC), "exec"), namespace)
    assert namespace["flow_trainer"].num_steps == 1
    flow_after = list(namespace["estimator"].parameters())
    assert any(not torch.equal(b, a) for b, a in zip(flow_before, flow_after))
    assert_trained_by_the_step(namespace["segformer"], x, namespace["estimator"].dim)
