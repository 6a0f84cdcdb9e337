"""FlowDensityEstimator against analytic densities, autograd Jacobians and a fitted known mixture."""

import math

import pytest
import torch
from torch import nn

from ddfp_lib import FlowDensityEstimator
from ddfp_lib.distributions import component_log_prob, mixture_log_prob
from ddfp_lib.flows import GlowCoupling


def permutations_of(est):
    return [t._permutation for t in est.flow._transforms if hasattr(t, "_permutation")]


def analytic_mixture_log_prob64(z, means, labels=None):
    """Direct (N, K, D) evaluation in float64: an independent reference for the prior."""
    z, means = z.double(), means.double()
    d = z.shape[1]
    sq = ((z[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    comp = -0.5 * sq - 0.5 * d * math.log(2 * math.pi)
    mix = torch.logsumexp(comp, dim=1) - math.log(means.shape[0])
    if labels is None:
        return mix
    own = comp.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    return torch.where(labels >= 0, own, mix)


def randomize_couplings(est, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in est.modules():
            if isinstance(module, GlowCoupling):
                for subnet in (module.subnet1, module.subnet2):
                    last = subnet[-1]
                    last.weight.copy_(scale * torch.randn(last.weight.shape, generator=g))
                    last.bias.copy_(scale * torch.randn(last.bias.shape, generator=g))
    return est


# At D=256 log p is about -600, where one float32 ulp is 6e-5: there the bound is relative.
@pytest.mark.parametrize("dim,num_classes,rtol", [(6, 4, 0.0), (32, 5, 0.0), (256, 21, 1e-6)])
def test_identity_flow_matches_gaussian_mixture_density_of_permuted_features(
    dim, num_classes, rtol
):
    est = FlowDensityEstimator(dim, num_classes, hidden_dim=32, seed=1)
    x = torch.randn(300, dim) + est.means[torch.randint(0, num_classes, (300,))].detach()
    z = x.clone()
    for perm in permutations_of(est):
        z = z[:, perm]
    expected = analytic_mixture_log_prob64(z, est.means.detach())
    got = est.log_prob(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-4, rtol=rtol)
    _, log_det = est(x)
    assert torch.equal(log_det, torch.zeros(300))


def test_labelled_rows_use_their_own_component_and_minus_one_the_mixture():
    est = FlowDensityEstimator(5, 3, hidden_dim=16, seed=2)
    x = torch.randn(40, 5)
    labels = torch.tensor([-1, 0, 1, 2] * 10)
    z = x.clone()
    for perm in permutations_of(est):
        z = z[:, perm]
    expected = analytic_mixture_log_prob64(z, est.means.detach(), labels)
    assert torch.allclose(est.log_prob(x, labels).double(), expected, atol=1e-4, rtol=0)
    assert torch.allclose(est.nll(x, labels).double(), -expected.mean(), atol=1e-4)


def test_log_det_equals_log_abs_det_of_autograd_jacobian():
    est = randomize_couplings(FlowDensityEstimator(6, 3, hidden_dim=32, seed=3))
    x = torch.randn(8, 6)
    _, log_det = est(x)
    assert log_det.abs().max() > 0.1, "the couplings must be far from the identity for this test"
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda row: est(row[None])[0][0], x[i])
        assert torch.allclose(log_det[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-4)


def test_inverse_recovers_inputs_in_every_layout():
    est = randomize_couplings(FlowDensityEstimator(8, 2, hidden_dim=16, seed=4))
    maps = torch.randn(2, 8, 3, 5)
    z_map, log_det_map = est(maps)
    assert z_map.shape == maps.shape and log_det_map.shape == (2, 3, 5)
    assert torch.allclose(est.inverse(z_map), maps, atol=1e-4)
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 8)
    z_rows, log_det_rows = est(rows)
    assert torch.allclose(z_rows, z_map.permute(0, 2, 3, 1).reshape(-1, 8), atol=1e-6)
    assert torch.allclose(log_det_rows, log_det_map.reshape(-1), atol=1e-6)
    tokens = rows.reshape(2, 15, 8)
    assert torch.allclose(est.log_prob(tokens).reshape(-1), est.log_prob(rows), atol=1e-6)
    assert torch.allclose(est.inverse(est(tokens)[0]), tokens, atol=1e-4)


def test_expanded_prior_stays_accurate_with_a_large_shared_offset():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(21, 256, generator=g) + 20.0
    z = means[torch.randint(0, 21, (512,), generator=g)] + torch.randn(512, 256, generator=g)
    expected = analytic_mixture_log_prob64(z, means)
    assert (mixture_log_prob(z, means).double() - expected).abs().max() < 1e-2
    comp = component_log_prob(z, means).double()
    direct = -0.5 * ((z.double()[:, None] - means.double()[None]) ** 2).sum(-1) - 128 * math.log(
        2 * math.pi
    )
    assert (comp - direct).abs().max() < 1e-2


def test_fit_to_known_gaussian_mixture_reaches_true_nll_within_a_tenth_of_a_nat():
    torch.manual_seed(0)
    true_means = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 4.0]])
    scale = torch.tensor([0.6, 1.4])

    def sample(n, g):
        k = torch.randint(0, 3, (n,), generator=g)
        return true_means[k] + scale * torch.randn(n, 2, generator=g), k

    def true_log_prob(x):
        z = (x.double() - true_means.double()[:, None, :]) / scale.double()
        comp = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi) - torch.log(scale.double()).sum()
        return torch.logsumexp(comp, dim=0) - math.log(3)

    g = torch.Generator().manual_seed(1)
    train, _ = sample(2048, g)
    held_out, _ = sample(4096, g)
    est = FlowDensityEstimator(2, 3, num_blocks=4, hidden_dim=32, seed=0)
    with torch.no_grad():
        est.prior.means.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    opt = torch.optim.Adam(est.parameters(), lr=5e-3)
    for _ in range(300):
        opt.zero_grad()
        est.nll(train).backward()
        opt.step()
    gap = est.nll(held_out).item() - (-true_log_prob(held_out).mean().item())
    assert abs(gap) < 0.1, gap


def test_state_dict_round_trip_gives_identical_log_prob():
    est = randomize_couplings(FlowDensityEstimator(10, 4, hidden_dim=16, seed=5))
    other = FlowDensityEstimator(10, 4, hidden_dim=16, seed=99)
    x = torch.randn(20, 10)
    assert not torch.equal(est.log_prob(x), other.log_prob(x))
    state = est.state_dict()
    assert "prior.means" in state and any(k.endswith("_permutation") for k in state)
    other.load_state_dict(state)
    assert torch.equal(est.log_prob(x), other.log_prob(x))
    assert torch.equal(other.means, est.means)


def test_frozen_means_are_a_buffer_and_receive_no_gradient():
    est = FlowDensityEstimator(4, 2, hidden_dim=8, learn_means=False, seed=0)
    assert all(p is not est.means for p in est.parameters())
    assert "prior.means" in est.state_dict()


def test_log_prob_is_float32_and_unchanged_under_bf16_autocast():
    est = randomize_couplings(FlowDensityEstimator(16, 3, hidden_dim=32, seed=6))
    x = torch.randn(64, 16)
    reference = est.log_prob(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = est.log_prob(x)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, reference, atol=1e-5)


def test_bits_per_dim_is_nll_over_dim_ln2():
    est = FlowDensityEstimator(6, 2, hidden_dim=8, seed=0)
    x = torch.randn(10, 6)
    assert torch.allclose(est.bits_per_dim(x), est.nll(x) / (6 * math.log(2)))


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(5), "shape"),
        (torch.randn(1, 2, 3, 4, 5), "shape"),
        (torch.randn(5, 7), "feature size 7"),
        (torch.randn(2, 7, 3, 3), "expected D=6"),
        (torch.tensor([[float("nan")] * 6]), "NaN"),
        (torch.tensor([[float("inf")] * 6]), "NaN or Inf"),
        (torch.ones(3, 6, dtype=torch.long), "floating"),
    ],
)
def test_bad_feature_inputs_raise_value_error_naming_the_problem(bad, match):
    est = FlowDensityEstimator(6, 2, hidden_dim=8, seed=0)
    with pytest.raises(ValueError, match=match):
        est.log_prob(bad)


def test_out_of_range_labels_raise_value_error_naming_the_value():
    est = FlowDensityEstimator(6, 3, hidden_dim=8, seed=0)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="label 3 is out of range"):
        est.log_prob(x, torch.tensor([0, 1, 3, -1]))
    with pytest.raises(ValueError, match="label -2"):
        est.log_prob(x, torch.tensor([0, -2, 1, 1]))
    with pytest.raises(ValueError, match="labels has shape"):
        est.log_prob(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        est.log_prob(x, torch.zeros(4))


def test_parameter_count_matches_the_reference_flow_size():
    est = FlowDensityEstimator(256, 21)
    flow_params = sum(p.numel() for p in est.flow.parameters())
    assert flow_params == 2 * 2 * (128 * 256 + 256 + 256 * 256 + 256 + 256 * 256 + 256)
    assert 0.65e6 < flow_params < 0.67e6


# dtypes ----------------------------------------------------------------------------------------


def test_float64_estimator_log_det_equals_slogdet_of_autograd_jacobian_to_1e_10():
    est = randomize_couplings(FlowDensityEstimator(6, 3, hidden_dim=32, seed=3)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    z, log_det = est(x)
    assert z.dtype == log_det.dtype == torch.float64
    assert log_det.abs().max() > 0.1, "the couplings must be far from the identity for this test"
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda row: est(row[None])[0][0], x[i])
        assert jac.dtype == torch.float64
        assert abs(log_det[i].item() - torch.linalg.slogdet(jac).logabsdet.item()) < 1e-10


def test_float64_identity_flow_matches_the_analytic_mixture_to_1e_10():
    est = FlowDensityEstimator(32, 5, hidden_dim=16, seed=1).double()
    x = torch.randn(200, 32, dtype=torch.float64) + 3.0
    labels = torch.randint(-1, 5, (200,))
    z = x.clone()
    for perm in permutations_of(est):
        z = z[:, perm]
    means = est.means.detach()
    got = est.log_prob(x, labels)
    assert got.dtype == torch.float64
    assert (got - analytic_mixture_log_prob64(z, means, labels)).abs().max() < 1e-10


def test_float64_log_prob_passes_gradcheck_in_the_input_and_the_means():
    est = FlowDensityEstimator(4, 3, hidden_dim=8, learn_means=False, seed=7)
    est = randomize_couplings(est).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([-1, 0, 1, 2, -1])
    assert torch.autograd.gradcheck(lambda rows: est.log_prob(rows, labels), (x,))
    assert torch.autograd.gradcheck(lambda rows: est.log_prob(rows), (x,))

    def log_prob_of_means(means):
        est.prior.means = means  # a buffer (learn_means=False), so a plain tensor may replace it
        return est.log_prob(x.detach(), labels)

    means = est.means.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(log_prob_of_means(means).sum(), means)
    assert gradient.abs().min() > 0, "every mean must matter for the check to mean something"
    assert torch.autograd.gradcheck(log_prob_of_means, (means,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float32_estimator_computes_in_float32_whatever_the_input_dtype(dtype):
    est = randomize_couplings(FlowDensityEstimator(16, 3, hidden_dim=32, seed=6))
    x = torch.randn(64, 16).to(dtype)
    got = est.log_prob(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, est.log_prob(x.float()))
    z, log_det = est(x)
    assert z.dtype == log_det.dtype == torch.float32
    assert est.inverse(z.to(dtype)).dtype == torch.float32


def test_float64_estimator_stays_float64_under_autocast_and_for_float32_inputs():
    est = randomize_couplings(FlowDensityEstimator(16, 3, hidden_dim=32, seed=6)).double()
    x = torch.randn(64, 16, dtype=torch.float64)
    reference = est.log_prob(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = est.log_prob(x)
    assert under_autocast.dtype == torch.float64
    assert torch.equal(under_autocast, reference)
    from_float32 = est.log_prob(x.float())
    assert from_float32.dtype == torch.float64
    assert torch.equal(from_float32, est.log_prob(x.float().double()))


@pytest.mark.parametrize("to_half", [nn.Module.half, nn.Module.bfloat16])
def test_half_precision_parameters_raise_value_error_saying_to_keep_float32(to_half):
    est = to_half(FlowDensityEstimator(6, 2, hidden_dim=8, seed=0))
    x = torch.randn(4, 6)
    for call in (est.log_prob, est.nll, est.forward, est.inverse):
        with pytest.raises(ValueError, match="keep the estimator in float32.*autocast"):
            call(x)


def test_mixed_parameter_dtypes_raise_value_error_naming_both():
    est = FlowDensityEstimator(6, 2, hidden_dim=8, seed=0)
    est.flow.double()
    with pytest.raises(ValueError, match="torch.float32, torch.float64"):
        est.log_prob(torch.randn(4, 6))
    assert est.prior.means.dtype == torch.float32
