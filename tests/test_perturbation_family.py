"""The baseline perturbations against independent computations of their formulas, and the rules they
share: layouts, dtype, determinism under a generator, the mask rule, errors, and the registry."""

import copy
import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddfp_lib import (
    DensityDescendingPerturbation,
    DropoutPerturbation,
    FeatureDropPerturbation,
    FlowDensityEstimator,
    RandomDirectionPerturbation,
    UniformNoisePerturbation,
    VATPerturbation,
    available_perturbations,
    build_perturbation,
)
from ddfp_lib.perturbations import (
    dropout,
    feature_drop,
    noise,
    random_direction,
    registry,
    vat,
)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def make(name, channels=8):
    if name == "ddfp":
        estimator = FlowDensityEstimator(channels, 3, hidden_dim=16, seed=0)
        return build_perturbation(name, estimator=estimator)
    return build_perturbation(name)


def head_for(name, channels=8):
    """VAT needs logits; everything else runs without a head."""
    return nn.Conv2d(channels, 3, 1) if name == "vat" else None


def row_head_for(name, channels=8):
    return nn.Linear(channels, 3) if name == "vat" else None


ALL = sorted(available_perturbations())
HEADLESS = ["dropout", "feature_drop", "noise", "random_direction"]


# --- shared rules ------------------------------------------------------------------------------


def test_registry_lists_every_perturbation_and_builds_each_class():
    assert available_perturbations() == (
        "ddfp",
        "dropout",
        "feature_drop",
        "noise",
        "random_direction",
        "vat",
    )
    assert [type(make(name)) for name in available_perturbations()] == [
        DensityDescendingPerturbation,
        DropoutPerturbation,
        FeatureDropPerturbation,
        UniformNoisePerturbation,
        RandomDirectionPerturbation,
        VATPerturbation,
    ]
    assert build_perturbation("Random-Direction", eps=2.0).eps == 2.0
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    assert build_perturbation("ddfp", estimator=est, eps=2.5).eps == 2.5


def test_registry_unknown_name_lists_the_choices_and_bad_argument_is_a_value_error():
    with pytest.raises(ValueError, match="choose one of ddfp, dropout, feature_drop"):
        build_perturbation("gaussian")
    with pytest.raises(ValueError, match="dropout"):
        build_perturbation("dropout", rate=0.5)


@pytest.mark.parametrize("name", ALL)
def test_map_and_row_layouts_keep_shape_and_dtype(name):
    perturbation = make(name)
    features = torch.randn(2, 8, 3, 4)
    out = perturbation(features, head=head_for(name), generator=seeded())
    assert out.shape == features.shape and out.dtype == features.dtype
    rows = torch.randn(5, 8)
    out_rows = perturbation(rows, head=row_head_for(name), generator=seeded())
    assert out_rows.shape == rows.shape and out_rows.dtype == rows.dtype
    half = perturbation(
        features.bfloat16(), head=None if name != "vat" else head_for(name).bfloat16()
    )
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


@pytest.mark.parametrize("name", ALL)
def test_same_generator_seed_gives_the_same_result_and_another_seed_differs(name):
    perturbation = make(name)
    features = torch.rand(2, 8, 4, 4) + 0.1
    head = head_for(name)
    first = perturbation(features, head=head, generator=seeded(3))
    second = perturbation(features, head=head, generator=seeded(3))
    assert torch.equal(first, second)
    if name != "ddfp":
        other = perturbation(features, head=head, generator=seeded(4))
        assert not torch.equal(first, other)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(2, 8, 3), "shape"),
        (torch.ones(2, 8, 3, 3, dtype=torch.long), "floating point"),
        (torch.full((2, 8, 3, 3), float("nan")), "NaN"),
        ("features", "torch.Tensor"),
    ],
)
def test_bad_features_raise_a_value_error_saying_what_was_expected(name, bad, match):
    with pytest.raises(ValueError, match=match):
        make(name)(bad, head=head_for(name))


@pytest.mark.parametrize("name", ALL)
def test_bad_mask_and_generator_raise_value_errors(name):
    perturbation = make(name)
    features = torch.randn(2, 8, 3, 3)
    head = head_for(name)
    with pytest.raises(ValueError, match="torch.bool"):
        perturbation(features, head=head, mask=torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="mask"):
        perturbation(features, head=head, mask=torch.ones(3, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="generator"):
        perturbation(features, head=head, generator=0)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: DropoutPerturbation(p=1.0), "p must be in"),
        (lambda: DropoutPerturbation(p=-0.1), "p must be in"),
        (lambda: UniformNoisePerturbation(r=0.0), "r must be > 0"),
        (lambda: FeatureDropPerturbation((0.9, 0.7)), "low <= high"),
        (lambda: RandomDirectionPerturbation(eps=0.0), "eps must be > 0"),
        (lambda: VATPerturbation(xi=0.0), "xi must be > 0"),
        (lambda: VATPerturbation(eps=-1.0), "eps must be > 0"),
    ],
)
def test_invalid_hyperparameters_raise_value_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("name", HEADLESS)
def test_mask_restricts_the_perturbation_to_masked_pixels(name):
    perturbation = make(name)
    features = torch.rand(2, 8, 5, 5) + 0.1
    mask = torch.rand(2, 5, 5, generator=seeded(9)) > 0.5
    everywhere = perturbation(features, generator=seeded(1))
    masked = perturbation(features, mask=mask, generator=seeded(1))
    inside = mask[:, None].expand_as(features)
    assert torch.equal(masked[~inside], features[~inside])
    assert torch.equal(masked[inside], everywhere[inside])
    assert not torch.equal(masked[inside], features[inside])


@pytest.mark.parametrize("name", HEADLESS)
def test_mask_at_a_coarser_head_resolution_is_resized_nearest_and_the_head_is_not_called(name):
    def head(_):
        raise AssertionError("the head must not be called")

    perturbation = make(name)
    features = torch.rand(2, 8, 4, 6) + 0.1
    coarse = torch.tensor([[[True, False, True], [False, True, False]]]).expand(2, 2, 3)
    fine = F.interpolate(coarse[:, None].float(), size=(4, 6), mode="nearest")[:, 0].bool()
    from_coarse = perturbation(features, head=head, mask=coarse, generator=seeded(2))
    from_fine = perturbation(features, mask=fine, generator=seeded(2))
    assert torch.equal(from_coarse, from_fine)


def test_row_mask_restricts_rows():
    features = torch.rand(6, 8) + 0.1
    mask = torch.tensor([True, False, True, False, False, True])
    out = UniformNoisePerturbation()(features, mask=mask, generator=seeded())
    assert torch.equal(out[~mask], features[~mask])
    assert (out[mask] != features[mask]).all()


@pytest.mark.parametrize(
    "module",
    [dropout, noise, feature_drop, random_direction, registry, vat],
    ids=lambda m: m.__name__,
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- dropout ---------------------------------------------------------------------------------


def test_dropout_matches_channel_bernoulli_times_inverse_keep_probability():
    features = torch.randn(3, 16, 4, 4)
    out = DropoutPerturbation(p=0.5)(features, generator=seeded(5))
    keep = torch.rand(3, 16, 1, 1, generator=seeded(5)) >= 0.5
    assert torch.equal(out, features * keep.float() * 2.0)
    ratio = out / features
    per_channel = ratio.flatten(2)
    assert torch.equal(per_channel.amin(2), per_channel.amax(2))


def test_dropout_drops_about_p_of_channels_and_is_active_in_eval_mode():
    perturbation = DropoutPerturbation(p=0.3).eval()
    out = perturbation(torch.ones(8, 512, 1, 1), generator=seeded(0))
    dropped = (out == 0).float().mean().item()
    assert 0.27 < dropped < 0.33
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))


def test_dropout_on_rows_drops_single_elements():
    rows = torch.ones(64, 32)
    out = DropoutPerturbation(p=0.5)(rows, generator=seeded(6))
    keep = torch.rand(64, 32, generator=seeded(6)) >= 0.5
    assert torch.equal(out, keep.float() * 2.0)
    kept_per_row = keep.sum(1)
    assert ((kept_per_row > 0) & (kept_per_row < 32)).all()


def test_dropout_gradient_is_the_same_scale_as_the_forward():
    features = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = DropoutPerturbation(p=0.5)(features, generator=seeded(7))
    out.sum().backward()
    assert torch.equal(features.grad, (out / features).detach())


def test_dropout_with_p_zero_is_the_identity():
    features = torch.randn(2, 6, 3, 3)
    assert torch.equal(DropoutPerturbation(p=0.0)(features), features)


# --- uniform noise ---------------------------------------------------------------------------


def test_uniform_noise_is_x_plus_x_times_one_sample_shared_over_the_batch():
    features = torch.randn(3, 4, 5, 5)
    out = UniformNoisePerturbation(r=0.3)(features, generator=seeded(11))
    n = (torch.rand(4, 5, 5, generator=seeded(11)) * 2 - 1) * 0.3
    assert torch.allclose(out, features + features * n, atol=1e-7)
    relative = (out - features) / features
    assert torch.allclose(relative[0], relative[2], atol=1e-5)
    assert relative.abs().max() <= 0.3 + 1e-5 and relative.abs().max() > 0.25


def test_uniform_noise_on_rows_shares_one_channel_vector():
    rows = torch.rand(7, 5) + 0.5
    out = UniformNoisePerturbation(r=0.2)(rows, generator=seeded(12))
    n = (torch.rand(5, generator=seeded(12)) * 2 - 1) * 0.2
    assert torch.allclose(out, rows * (1 + n), atol=1e-6)


# --- feature drop ----------------------------------------------------------------------------


def test_feature_drop_matches_the_cct_threshold_per_image():
    features = torch.rand(3, 6, 5, 5)
    out = FeatureDropPerturbation()(features, generator=seeded(13))
    attention = features.mean(1, keepdim=True)
    peak = attention.amax(dim=(2, 3), keepdim=True)
    u = 0.7 + 0.2 * torch.rand(3, 1, 1, 1, generator=seeded(13))
    expected = features * (attention < peak * u).float()
    assert torch.equal(out, expected)
    dropped = (out == 0).all(1)
    assert dropped.any(dim=(1, 2)).all() and (~dropped).any(dim=(1, 2)).all()


def test_feature_drop_with_a_fixed_fraction_keeps_exactly_the_pixels_below_it():
    means = torch.tensor([0.1, 0.5, 0.79, 0.81, 1.0])
    features = means.view(1, 1, 1, 5).expand(1, 3, 1, 5).contiguous()
    out = FeatureDropPerturbation((0.8, 0.8))(features)
    keep = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 5)
    assert torch.equal(out, features * keep)


def test_feature_drop_treats_rows_as_the_pixels_of_one_image():
    rows = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])
    out = FeatureDropPerturbation((0.5, 0.5))(rows)
    assert torch.equal(out, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))


# --- random direction ------------------------------------------------------------------------


def test_random_direction_has_norm_eps_and_no_preferred_direction():
    features = torch.randn(4, 8, 32, 32)
    delta = RandomDirectionPerturbation(eps=4.0)(features, generator=seeded(14)) - features
    norms = delta.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 4.0), atol=1e-4)
    mean_direction = (delta / 4.0).mean(dim=(0, 2, 3))
    assert mean_direction.abs().max() < 0.03
    expected = torch.randn(4, 8, 32, 32, generator=seeded(14))
    expected = 4.0 * expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(delta, expected, atol=1e-5)


def test_random_direction_support_matches_masked_ddfp_and_gradient_is_identity():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    features = torch.randn(2, 8, 5, 5, requires_grad=True)
    mask = torch.rand(2, 5, 5, generator=seeded(15)) > 0.5
    ddfp_delta = DensityDescendingPerturbation(est)(features, mask=mask) - features
    out = RandomDirectionPerturbation()(features, mask=mask)
    random_delta = out - features
    ddfp_support = ddfp_delta.detach().norm(dim=1) > 0
    random_support = random_delta.detach().norm(dim=1) > 0
    assert torch.equal(ddfp_support, mask) and torch.equal(random_support, mask)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(features.grad, weights)


# --- VAT -------------------------------------------------------------------------------------


def expected_vat_direction(features, weight, mask, seed, channel_scale=None):
    """xi -> 0 limit of one power iteration for a 1x1-conv head z = W x: normalize(W^T F W d),
    F = diag(p) - p p^T per pixel, summed over masked pixels, normalised per image; all float64."""
    start = torch.rand(features.shape, generator=seeded(seed)) - 0.5
    d = (start / start.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).double()
    x = features.double()
    w = weight.double()
    if channel_scale is None:
        channel_scale = torch.ones(x.shape[0], x.shape[1], 1, 1, dtype=torch.float64)
    w_b = w[None] * channel_scale[:, None, :, 0, 0]
    logits = torch.einsum("bkc,bchw->bkhw", w_b, x)
    p = logits.softmax(1)
    s = torch.einsum("bkc,bchw->bkhw", w_b, d)
    fisher_s = p * s - p * (p * s).sum(1, keepdim=True)
    if mask is not None:
        fisher_s = fisher_s * mask[:, None].double()
    g = torch.einsum("bkc,bkhw->bchw", w_b, fisher_s)
    norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return torch.where(norm > 0, g / norm.clamp_min(1e-300), torch.zeros_like(g))


def test_vat_matches_the_analytic_power_iteration_per_image():
    torch.manual_seed(0)
    head = nn.Conv2d(6, 4, 1, bias=False).double()
    head.weight.data.mul_(3.0)
    features = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    mask = torch.rand(2, 4, 4, generator=seeded(16)) > 0.3
    out = VATPerturbation(xi=1e-6, eps=2.0)(features, head=head, mask=mask, generator=seeded(17))
    r = out - features
    expected = 2.0 * expected_vat_direction(features, head.weight[:, :, 0, 0], mask, 17)
    cosine = torch.cosine_similarity(r.flatten(1), expected.flatten(1), dim=1)
    assert cosine.min() > 0.999
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((2,), 2.0, dtype=torch.float64))
    outside = (~mask)[:, None].expand_as(r)
    assert r[outside].abs().max() == 0


def test_vat_in_float32_needs_a_larger_xi_than_cct_to_find_the_float64_direction():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 1))
    features = torch.relu(torch.randn(2, 32, 12, 12))
    reference = vat.virtual_adversarial_direction(
        features.double(), copy.deepcopy(head).double(), 1e-6, generator=seeded()
    )

    def cosine(xi):
        direction = vat.virtual_adversarial_direction(features, head, xi, generator=seeded())
        return torch.cosine_similarity(direction.flatten(1).double(), reference.flatten(1), dim=1)

    assert cosine(1e-1).min() > 0.99
    assert cosine(1e-6).abs().max() < 0.3


def test_vat_image_without_masked_pixels_gets_no_perturbation_and_no_nan():
    head = nn.Conv2d(6, 4, 1)
    features = torch.randn(2, 6, 3, 3)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[1, 0, 0] = True
    r = VATPerturbation(xi=1e-3)(features, head=head, mask=mask, generator=seeded()) - features
    assert torch.equal(r[0], torch.zeros_like(r[0]))
    assert torch.allclose(r[1].norm(), torch.tensor(2.0), atol=1e-5)
    assert torch.isfinite(r).all()


def test_vat_rows_are_normalised_one_by_one():
    head = nn.Linear(5, 3)
    rows = torch.randn(7, 5)
    r = VATPerturbation(xi=1e-3, eps=1.5)(rows, head=head, generator=seeded()) - rows
    assert torch.allclose(r.norm(dim=1), torch.full((7,), 1.5), atol=1e-5)


def test_vat_clean_and_probe_calls_share_dropout_masks():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 1, bias=False).double()
    conv.weight.data.mul_(3.0)
    head = nn.Sequential(nn.Dropout2d(0.5), conv).train()
    features = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    torch.manual_seed(123)
    r = VATPerturbation(xi=1e-6)(features, head=head, generator=seeded(18)) - features
    torch.manual_seed(123)
    channel_scale = nn.Dropout2d(0.5)(torch.ones(2, 6, 1, 1, dtype=torch.float64))
    expected = 2.0 * expected_vat_direction(
        features, conv.weight[:, :, 0, 0], None, 18, channel_scale
    )
    cosine = torch.cosine_similarity(r.flatten(1), expected.flatten(1), dim=1)
    assert cosine.min() > 0.999


def test_vat_leaves_the_head_untouched_and_gradient_flows_as_identity():
    head = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1)
    ).train()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    features = torch.randn(2, 8, 4, 4, requires_grad=True)
    snapshot = features.detach().clone()
    out = VATPerturbation(xi=1e-3)(features, head=head, generator=seeded())
    assert torch.equal(features.detach(), snapshot)
    assert all(torch.equal(v, state[k]) for k, v in head.state_dict().items())
    assert all(p.grad is None for p in head.parameters())
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(features.grad, weights)


def test_vat_without_head_or_with_a_head_that_changes_layout_raises():
    features = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="needs head"):
        VATPerturbation()(features)
    with pytest.raises(ValueError, match="layout of the features"):
        VATPerturbation()(features, head=lambda x: x.flatten(1))
    with pytest.raises(ValueError, match="mask has shape"):
        VATPerturbation()(
            features, head=nn.Conv2d(8, 3, 2, stride=2), mask=torch.ones(2, 3, 3, dtype=torch.bool)
        )
