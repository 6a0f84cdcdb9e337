"""DensityDescendingPerturbation against the analytic mixture gradient, and its side-effect rules."""

import pytest
import torch
from torch import nn

from ddfp_lib import DensityDescendingPerturbation, FlowDensityEstimator
from ddfp_lib.perturbations import ddfp as ddfp_module
from ddfp_lib.perturbations import density_descent_direction


def permuted(est, x):
    for t in est.flow._transforms:
        if hasattr(t, "_permutation"):
            x = x[:, t._permutation]
    return x


def analytic_nll_gradient64(est, rows):
    """d/dx of -log mixture(P x) in float64: P^T sum_k r_k (z - mu_k), r the responsibilities."""
    rows = rows.double()
    z = permuted(est, rows)
    means = est.means.detach().double()
    diff = z[:, None, :] - means[None]
    resp = torch.softmax(-0.5 * (diff**2).sum(-1), dim=1)
    grad_z = (resp[..., None] * diff).sum(1)
    grad_x = torch.empty_like(grad_z)
    perm_total = permuted(est, torch.arange(rows.shape[1])[None].double())[0].long()
    grad_x[:, perm_total] = grad_z
    return grad_x


def fuse_block(in_ch=12, out_ch=8):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.Dropout2d(0.1),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.Dropout2d(0.1),
    )


def test_direction_matches_analytic_mixture_gradient_and_norm_is_eps_on_masked_pixels():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    ddfp = DensityDescendingPerturbation(est, eps=4.0)
    features = torch.randn(2, 8, 5, 6)
    mask = torch.rand(2, 5, 6) > 0.4
    delta = ddfp(features, mask=mask) - features
    rows = features.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = analytic_nll_gradient64(est, rows)
    delta_rows = delta.permute(0, 2, 3, 1).reshape(-1, 8).double()
    m = mask.reshape(-1)
    cosine = torch.cosine_similarity(delta_rows[m], expected[m], dim=1)
    assert cosine.min() > 0.999
    norms = delta_rows.norm(dim=1)
    assert torch.allclose(norms[m], torch.full_like(norms[m], 4.0), atol=1e-4)
    assert torch.equal(norms[~m], torch.zeros_like(norms[~m]))


def test_all_false_mask_returns_the_input_unchanged():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    features = torch.randn(2, 8, 4, 4)
    out = DensityDescendingPerturbation(est)(features, mask=torch.zeros(2, 4, 4, dtype=torch.bool))
    assert torch.equal(out, features)
    assert not torch.isnan(out).any()


def test_map_and_row_layouts_agree():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    ddfp = DensityDescendingPerturbation(est, eps=2.0)
    features = torch.randn(3, 8, 4, 5)
    mask = torch.rand(3, 4, 5) > 0.5
    from_map = ddfp(features, mask=mask).permute(0, 2, 3, 1).reshape(-1, 8)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 8)
    from_rows = ddfp(rows, mask=mask.reshape(-1))
    assert torch.allclose(from_map, from_rows, atol=1e-6)


def test_linear_head_direction_is_head_transpose_times_density_gradient():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = nn.Conv2d(12, 8, 1, bias=True)
    features = torch.randn(2, 12, 3, 3)
    out = DensityDescendingPerturbation(est, eps=1.0)(features, head=head)
    h_rows = head(features).detach().permute(0, 2, 3, 1).reshape(-1, 8)
    grad_h = analytic_nll_gradient64(est, h_rows)
    grad_v = grad_h @ head.weight.detach().double()[:, :, 0, 0]
    expected = grad_v / grad_v.norm(dim=1, keepdim=True)
    got = (out - features).permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert torch.allclose(got, expected, atol=1e-4)


def test_fuse_block_head_is_left_untouched_and_gradient_flows_as_identity():
    torch.manual_seed(0)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().train()
    buffers_before = {k: v.clone() for k, v in head.state_dict().items()}
    features = torch.randn(2, 12, 6, 6, requires_grad=True)
    snapshot = features.detach().clone()
    mask = torch.rand(2, 6, 6) > 0.3
    out = DensityDescendingPerturbation(est, eps=4.0)(features, head=head, mask=mask)
    assert torch.equal(features.detach(), snapshot)
    for name, value in head.state_dict().items():
        assert torch.equal(value, buffers_before[name]), name
    assert all(p.grad is None for p in head.parameters())
    assert all(p.grad is None for p in est.parameters())
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(features.grad, weights)
    assert all(p.grad is None for p in head.parameters())
    delta_norm = (out - features).detach().norm(dim=1)
    assert torch.isfinite(delta_norm).all() and delta_norm.max() <= 4.0 + 1e-4


def test_batch_is_processed_as_independent_images_in_one_call():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().eval()
    ddfp = DensityDescendingPerturbation(est, eps=3.0)
    features = torch.randn(3, 12, 5, 5)
    mask = torch.rand(3, 5, 5) > 0.5
    batched = ddfp(features, head=head, mask=mask)
    one_by_one = torch.cat(
        [ddfp(features[i : i + 1], head=head, mask=mask[i : i + 1]) for i in range(3)]
    )
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_bf16_autocast_result_is_finite_and_close_to_float32():
    torch.manual_seed(0)
    est = FlowDensityEstimator(16, 3, hidden_dim=32, seed=0)
    head = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1)).eval()
    features = torch.randn(2, 24, 6, 6)
    ddfp = DensityDescendingPerturbation(est, eps=4.0)
    reference = ddfp(features, head=head) - features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ddfp(features, head=head)
    assert out.dtype == features.dtype
    delta = out - features
    assert torch.isfinite(delta).all()
    cos = torch.cosine_similarity(delta.flatten(), reference.flatten(), dim=0)
    assert cos > 0.99


def test_bf16_features_keep_their_dtype():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    features = torch.randn(2, 8, 3, 3).bfloat16()
    out = DensityDescendingPerturbation(est)(features)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_compiled_call_matches_eager():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    ddfp = DensityDescendingPerturbation(est, eps=4.0)
    head = nn.Conv2d(12, 8, 1)
    features = torch.randn(2, 12, 4, 4)
    mask = torch.rand(2, 4, 4) > 0.5
    eager = ddfp(features, head=head, mask=mask)
    compiled = torch.compile(lambda f, m: ddfp(f, head=head, mask=m), backend="eager")
    assert torch.allclose(compiled(features, mask), eager, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist only on CUDA")
@pytest.mark.parametrize(
    "options",
    [{"eps": 4.0}, {"chunk_rows": None}, {"head_mode": "batch_stats", "min_grad_ratio": 0.1}],
)
def test_no_host_device_synchronisation_on_cuda(options):
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0).cuda()
    ddfp = DensityDescendingPerturbation(est, **options)
    head = fuse_block().cuda().train()
    features = torch.randn(2, 12, 6, 6, device="cuda")
    mask = torch.rand(2, 6, 6, device="cuda") > 0.5
    ddfp(features, head=head, mask=mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ddfp(features, head=head, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == features.shape


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda d: d(torch.randn(2, 8, 3)), "shape"),
        (lambda d: d(torch.randn(4, 7)), "feature size 7"),
        (lambda d: d(torch.full((2, 8, 2, 2), float("nan"))), "NaN"),
        (
            lambda d: d(torch.randn(2, 8, 3, 3), mask=torch.ones(2, 3, 4, dtype=torch.bool)),
            "mask has shape",
        ),
        (lambda d: d(torch.randn(2, 8, 3, 3), mask=torch.ones(2, 3, 3)), "torch.bool"),
        (lambda d: d(torch.randn(2, 8, 3, 3), head=nn.Conv2d(8, 5, 1)), "expected D=8"),
        (
            lambda d: d(
                torch.randn(2, 8, 3, 3),
                head=nn.Conv2d(8, 8, 1),
                mask=torch.ones(2, 3, dtype=torch.bool),
            ),
            "mask has shape",
        ),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_problem(call, match):
    ddfp = DensityDescendingPerturbation(FlowDensityEstimator(8, 3, hidden_dim=16, seed=0))
    with pytest.raises(ValueError, match=match):
        call(ddfp)


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_non_positive_eps_is_rejected(eps):
    with pytest.raises(ValueError, match="eps must be > 0"):
        DensityDescendingPerturbation(FlowDensityEstimator(8, 3, hidden_dim=16), eps=eps)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_chunked_evaluation_equals_the_single_call(chunk_rows, with_head, with_mask):
    torch.manual_seed(1)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().eval() if with_head else None
    features = torch.randn(2, 12 if with_head else 8, 5, 6)
    mask = torch.rand(2, 5, 6) > 0.4 if with_mask else None
    single = DensityDescendingPerturbation(est, eps=3.0, chunk_rows=None)(
        features, head=head, mask=mask
    )
    chunked = DensityDescendingPerturbation(est, eps=3.0, chunk_rows=chunk_rows)(
        features, head=head, mask=mask
    )
    assert torch.allclose(chunked, single, atol=1e-5)
    if with_mask and not with_head:
        assert torch.equal(chunked.permute(0, 2, 3, 1)[~mask], features.permute(0, 2, 3, 1)[~mask])


def test_chunked_evaluation_is_side_effect_free_and_passes_gradient_as_identity():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().train()
    buffers_before = {k: v.clone() for k, v in head.state_dict().items()}
    features = torch.randn(2, 12, 6, 6, requires_grad=True)
    mask = torch.rand(2, 6, 6) > 0.3
    out = DensityDescendingPerturbation(est, chunk_rows=5)(features, head=head, mask=mask)
    for name, value in head.state_dict().items():
        assert torch.equal(value, buffers_before[name]), name
    assert all(p.grad is None for p in [*head.parameters(), *est.parameters()])
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(features.grad, weights)


def test_chunked_evaluation_of_an_empty_mask_leaves_features_unchanged():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    features = torch.randn(2, 8, 3, 3)
    out = DensityDescendingPerturbation(est, chunk_rows=4)(
        features, mask=torch.zeros(2, 3, 3, dtype=torch.bool)
    )
    assert torch.equal(out, features)


@pytest.mark.parametrize("chunk_rows", [0, -3, 2.5, True, "dense"])
def test_bad_chunk_rows_is_rejected(chunk_rows):
    estimator = FlowDensityEstimator(8, 3, hidden_dim=16)
    with pytest.raises(ValueError, match="chunk_rows"):
        DensityDescendingPerturbation(estimator, chunk_rows=chunk_rows)
    with pytest.raises(ValueError, match="chunk_rows"):
        density_descent_direction(estimator, torch.randn(4, 8), chunk_rows=chunk_rows)


# ------------------------------------------------------------------ chunk_rows="auto"
@pytest.fixture(params=["masked_rows", "sync_free"])
def auto_path(request, monkeypatch):
    """The two paths of ``chunk_rows="auto"`` on the CPU: the one it takes there (masked rows
    only) and the one it takes on CUDA (every row, nothing read on the host), forced here."""
    if request.param == "sync_free":
        monkeypatch.setattr(ddfp_module, "_mask_is_free_to_read", lambda device: False)
    return request.param


def mask_of_density(shape, density, seed=0):
    """A bool mask with exactly ``round(density * numel)`` True entries."""
    count = round(density * torch.Size(shape).numel())
    order = torch.randperm(torch.Size(shape).numel(), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(torch.Size(shape).numel(), dtype=torch.bool)
    mask[order[:count]] = True
    return mask.reshape(shape)


def record_flow_rows(est, monkeypatch):
    """The number of rows of every flow evaluation of ``est``, in call order."""
    sizes = []
    evaluate = est.log_prob_rows

    def recording(rows, labels=None):
        sizes.append(rows.shape[0])
        return evaluate(rows, labels)

    monkeypatch.setattr(est, "log_prob_rows", recording)
    return sizes


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_default_step_equals_the_dense_step_for_masks_of_every_density(auto_path, density):
    torch.manual_seed(8)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().eval()
    features = torch.randn(2, 12, 10, 10)
    mask = mask_of_density((2, 10, 10), density)
    dense = DensityDescendingPerturbation(est, eps=3.0, chunk_rows=None)
    default = DensityDescendingPerturbation(est, eps=3.0)
    expected = dense(features, head=head, mask=mask) - features
    delta = default(features, head=head, mask=mask) - features
    assert torch.isfinite(delta).all()
    if density == 0.0:
        assert torch.equal(delta, torch.zeros_like(delta))
        return
    cosine = torch.cosine_similarity(delta.flatten().double(), expected.flatten().double(), dim=0)
    assert cosine > 0.9999
    torch.testing.assert_close(delta.norm(dim=1), expected.norm(dim=1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_masked_rows_beyond_one_chunk_get_their_exact_gradient(auto_path, density, monkeypatch):
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    capacity = ddfp_module.AUTO_CHUNK_ROWS
    rows = torch.randn(4 * capacity + 3, 8)
    mask = mask_of_density((rows.shape[0],), density, seed=1)
    expected = density_descent_direction(est, rows, mask=mask, chunk_rows=None)
    sizes = record_flow_rows(est, monkeypatch)
    got = density_descent_direction(est, rows, mask=mask)
    if auto_path == "sync_free":
        assert sizes == [capacity] * 4 + [3], "every row, in chunks fixed by the shape"
    else:
        assert sum(sizes) == int(mask.sum()) and max(sizes) <= capacity, "the masked rows only"
    assert len(sizes) > 1, "the masked rows overflow one chunk"
    cosine = torch.cosine_similarity(got.double(), expected.double(), dim=1)
    assert cosine[mask].min() > 0.9999
    torch.testing.assert_close(got.norm(dim=1), expected.norm(dim=1), rtol=0, atol=1e-5)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


def peak_cpu_allocation_bytes(fn, *args, **kwargs):
    """Peak of the bytes the CPU allocator holds during ``fn(*args, **kwargs)`` above what it held
    before, from the allocation and free events torch.profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn(*args, **kwargs)
    changes = []
    for event in profiler.events():
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            changes.append((event.time_range.start, change))
    live = peak = 0
    for _, change in sorted(changes):
        live += change
        peak = max(peak, live)
    return peak


def test_memory_of_the_default_step_is_bounded_by_the_chunk_not_by_the_row_count(
    auto_path, monkeypatch
):
    monkeypatch.setattr(ddfp_module, "AUTO_CHUNK_ROWS", 1024)
    est = FlowDensityEstimator(8, 3, hidden_dim=128, seed=0)
    small, large = 2048, 8192
    growth = {}
    for chunk_rows in ("auto", None):
        ddfp = DensityDescendingPerturbation(est, eps=4.0, chunk_rows=chunk_rows)
        peaks = []
        for n in (small, large):
            rows = torch.randn(n, 8)
            mask = mask_of_density((n,), 0.5)
            peaks.append(peak_cpu_allocation_bytes(ddfp, rows, mask=mask))
        growth[chunk_rows] = peaks[1] - peaks[0]
    # What must grow with N: the row-sized inputs and outputs of the step, a few (N, 8) tensors.
    row_sized = 16 * (large - small) * 8 * 4
    assert growth["auto"] < row_sized
    assert growth[None] > 4 * row_sized, "the probe must see the flow's graph of every row"


def test_the_masked_rows_step_holds_no_copy_of_the_head_output_beyond_its_gradient(monkeypatch):
    """On the CPU the default step evaluates the masked rows straight from the head output and
    frees the output before the head's backward pass: its peak stays within about one head output
    of the head's own forward and backward pass (a copy of every row, a row-layout gradient and a
    separate direction would each add one more)."""
    monkeypatch.setattr(ddfp_module, "AUTO_CHUNK_ROWS", 64)
    torch.manual_seed(0)
    est = FlowDensityEstimator(16, 3, hidden_dim=16, seed=0)
    head = fuse_block(24, 16).train()
    features = torch.randn(2, 24, 64, 64)
    mask = mask_of_density((2, 64, 64), 0.3)

    def head_alone():
        leaf = features.detach().requires_grad_(True)
        return torch.autograd.grad(head(leaf).sum(), leaf)[0]

    step = DensityDescendingPerturbation(est, eps=2.0)
    floor = peak_cpu_allocation_bytes(head_alone)
    peak = peak_cpu_allocation_bytes(step, features, head=head, mask=mask)
    output_bytes = 2 * 16 * 64 * 64 * 4
    assert peak - floor < 1.5 * output_bytes, (peak, floor)


@pytest.mark.parametrize("layout", ["rows", "maps", "channels_last_maps"])
def test_masked_rows_path_equals_the_dense_call_in_every_layout(layout):
    """Gathering the masked rows straight from the head output (or features) in their own layout
    gives the dense call's step."""
    torch.manual_seed(5)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = None
    if layout == "rows":
        features, mask = torch.randn(40, 8), torch.rand(40) > 0.5
    else:
        head = fuse_block().eval()
        features, mask = torch.randn(2, 12, 5, 6), torch.rand(2, 5, 6) > 0.5
        if layout == "channels_last_maps":
            features = features.contiguous(memory_format=torch.channels_last)
            head = head.to(memory_format=torch.channels_last)
    dense = DensityDescendingPerturbation(est, eps=2.0, chunk_rows=None)(
        features, head=head, mask=mask
    )
    masked = DensityDescendingPerturbation(est, eps=2.0, chunk_rows=4)(
        features, head=head, mask=mask
    )
    torch.testing.assert_close(masked, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "bfloat16"])
def test_backward_through_head_equals_the_vector_jacobian_product(layout):
    torch.manual_seed(3)
    head = fuse_block(12, 8).eval()
    features = torch.randn(2, 12, 7, 9)
    weights = torch.randn(2, 8, 7, 9)
    if layout in ("channels_last", "mixed"):
        features = features.contiguous(memory_format=torch.channels_last)
        head = head.to(memory_format=torch.channels_last)
    if layout == "channels_last":
        weights = weights.contiguous(memory_format=torch.channels_last)
    leaf = features.detach().requires_grad_(True)
    dtype = torch.bfloat16 if layout == "bfloat16" else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=layout == "bfloat16"):
        outputs = head(leaf)
    weights = weights.to(dtype)
    expected = torch.autograd.grad(outputs, leaf, weights, retain_graph=True)[0]
    held = [outputs, weights]
    got = ddfp_module._backward_through_head(leaf, held)
    assert held == []
    assert torch.equal(got, expected)


# ------------------------------------------------------------------ direction options
def reference_direction(est, features, head, mask):
    """The reference computation written out: the head as it is, autograd, per-pixel unit."""
    leaf = features.detach().clone().requires_grad_(True)
    h = head(leaf)
    rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    nll = -est.log_prob(rows) * mask.reshape(-1).float()
    (g,) = torch.autograd.grad(nll.sum(), leaf)
    norm = g.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, g / norm, torch.zeros_like(g))


def cosine_per_pixel(a, b):
    return torch.cosine_similarity(a, b, dim=1).flatten()


def test_default_direction_is_the_reference_computation_with_the_heads_dropout():
    import copy

    torch.manual_seed(3)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().train()
    features = torch.randn(2, 12, 6, 6)
    mask = torch.rand(2, 6, 6) > 0.5
    rng = torch.get_rng_state()
    got = density_descent_direction(est, features, head, mask)
    torch.set_rng_state(rng)
    expected = reference_direction(est, features, copy.deepcopy(head), mask)
    assert torch.allclose(got, expected, atol=1e-5)
    again = density_descent_direction(est, features, head, mask)
    assert cosine_per_pixel(got, again).median() < 0.99, "dropout must make the default random"


@pytest.mark.parametrize("head_mode", ["batch_stats", "running_stats"])
def test_deterministic_head_modes_give_the_same_direction_on_every_call(head_mode):
    torch.manual_seed(4)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().train()
    features = torch.randn(2, 12, 6, 6)
    mask = torch.rand(2, 6, 6) > 0.5
    first = density_descent_direction(est, features, head, mask, head_mode=head_mode)
    second = density_descent_direction(est, features, head, mask, head_mode=head_mode)
    cosine = cosine_per_pixel(first, second)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-6)
    assert all(m.training for m in head.modules()), "the head's modes must come back"


def test_batch_stats_mode_equals_the_head_without_dropout_in_training():
    import copy

    torch.manual_seed(5)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().train()
    with torch.no_grad():
        for layer in head.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.add_(2.0)
    features = torch.randn(2, 12, 6, 6)
    mask = torch.rand(2, 6, 6) > 0.5
    no_dropout = copy.deepcopy(head)
    for layer in no_dropout.modules():
        if isinstance(layer, nn.Dropout2d):
            layer.p = 0.0
    got = density_descent_direction(est, features, head, mask, head_mode="batch_stats")
    assert torch.allclose(got, reference_direction(est, features, no_dropout, mask), atol=1e-5)
    running = density_descent_direction(est, features, head, mask, head_mode="running_stats")
    evaluated = reference_direction(est, features, copy.deepcopy(head).eval(), mask)
    assert torch.allclose(running, evaluated, atol=1e-5)
    assert cosine_per_pixel(got, running).median() < 0.99


def test_running_stats_mode_of_an_aux_bn_head_uses_the_auxiliary_running_statistics():
    import copy

    from ddfp_lib import convert_to_dual_bn, perturbed_bn

    torch.manual_seed(6)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = convert_to_dual_bn(fuse_block()).train()
    aux_eval = fuse_block()
    with torch.no_grad():
        for dual, plain in zip(
            [m for m in head.modules() if hasattr(m, "aux")],
            [m for m in aux_eval.modules() if isinstance(m, nn.BatchNorm2d)],
        ):
            dual.aux.running_mean.add_(torch.randn_like(dual.aux.running_mean))
            dual.aux.running_var.mul_(3.0)
            plain.load_state_dict(dual.aux.state_dict())
    for target, source in zip(aux_eval, head):
        if isinstance(target, nn.Conv2d):
            target.load_state_dict(source.state_dict())
    features = torch.randn(2, 12, 5, 5)
    mask = torch.rand(2, 5, 5) > 0.5
    with perturbed_bn(head):
        got = density_descent_direction(est, features, head, mask, head_mode="running_stats")
    expected = reference_direction(est, features, copy.deepcopy(aux_eval).eval(), mask)
    assert torch.allclose(got, expected, atol=1e-5)


def test_min_grad_ratio_zeroes_pixels_far_below_the_masked_median():
    torch.manual_seed(7)
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().train()
    features = torch.randn(2, 12, 8, 8)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, :2, :2] = True
    common = dict(head_mode="batch_stats")
    plain = density_descent_direction(est, features, head, mask, **common)
    local = density_descent_direction(est, features, head, mask, min_grad_ratio=0.2, **common)
    # Independent computation: raw gradient norms, boolean indexing for the median.
    no_dropout = fuse_block().train()
    no_dropout.load_state_dict(head.state_dict())
    for layer in no_dropout.modules():
        if isinstance(layer, nn.Dropout2d):
            layer.p = 0.0
    leaf = features.clone().requires_grad_(True)
    h = no_dropout(leaf)
    nll = -est.log_prob(h.permute(0, 2, 3, 1).reshape(-1, 8)) * mask.reshape(-1).float()
    (g,) = torch.autograd.grad(nll.sum(), leaf)
    norm = g.norm(dim=1)
    keep = norm >= 0.2 * norm[mask].median()
    assert keep.any() and not keep.all()
    plain_norm, local_norm = plain.norm(dim=1), local.norm(dim=1)
    assert torch.allclose(plain_norm, torch.ones_like(plain_norm), atol=1e-5), "BN reaches all"
    assert torch.equal(local_norm == 0, ~keep)
    assert torch.allclose(
        local[keep.unsqueeze(1).expand_as(local)], plain[keep.unsqueeze(1).expand_as(plain)]
    )
    assert not keep[1].any(), "the image without masked pixels is far from the mask everywhere"


def test_min_grad_ratio_with_rows_and_with_a_mask_at_another_resolution():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    rows = torch.randn(40, 8)
    mask = torch.rand(40) > 0.5
    g = analytic_nll_gradient64(est, rows).float() * mask[:, None]
    norm = g.norm(dim=1)
    keep = norm >= 0.5 * norm[mask].median()
    got = density_descent_direction(est, rows, mask=mask, min_grad_ratio=0.5)
    assert torch.equal(got.norm(dim=1) > 0.5, keep)
    head = nn.Conv2d(8, 8, 2, stride=2)
    features = torch.randn(1, 8, 6, 6)
    coarse = torch.zeros(1, 3, 3, dtype=torch.bool)
    coarse[0, 0, 0] = True
    out = density_descent_direction(est, features, head, coarse, min_grad_ratio=0.1)
    assert out.shape == features.shape and torch.isfinite(out).all()
    assert out[0, :, :2, :2].norm(dim=0).gt(0.99).all() and out[0, :, 2:, 2:].eq(0).all()


def test_min_grad_ratio_without_masked_pixels_moves_nothing_and_gives_no_nan():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    head = fuse_block().train()
    features = torch.randn(2, 12, 4, 4)
    nothing = torch.zeros(2, 4, 4, dtype=torch.bool)
    out = density_descent_direction(est, features, head, nothing, min_grad_ratio=0.1)
    assert torch.equal(out, torch.zeros_like(out))


def test_direction_options_reach_the_module_and_are_checked():
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    ddfp = DensityDescendingPerturbation(est, head_mode="running_stats", min_grad_ratio=0.1)
    assert "head_mode='running_stats'" in repr(ddfp) and "min_grad_ratio=0.1" in repr(ddfp)
    assert "chunk_rows" not in repr(ddfp)
    assert "chunk_rows=None" in repr(DensityDescendingPerturbation(est, chunk_rows=None))
    head = fuse_block().train()
    features = torch.randn(2, 12, 4, 4)
    assert torch.equal(ddfp(features, head=head), ddfp(features, head=head))
    with pytest.raises(ValueError, match="head_mode"):
        DensityDescendingPerturbation(est, head_mode="eval")
    with pytest.raises(ValueError, match="min_grad_ratio"):
        DensityDescendingPerturbation(est, min_grad_ratio=-0.1)
    with pytest.raises(ValueError, match="nn.Module"):
        DensityDescendingPerturbation(est, head_mode="batch_stats")(
            torch.randn(2, 8, 3, 3), head=lambda x: x
        )


@pytest.mark.parametrize("chunk_rows", ["auto", None, 7])
def test_float64_features_and_estimator_give_a_float64_step_along_the_exact_gradient(chunk_rows):
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0).double()
    ddfp = DensityDescendingPerturbation(est, eps=4.0, chunk_rows=chunk_rows)
    features = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    mask = torch.rand(2, 5, 6) > 0.4
    perturbed = ddfp(features, mask=mask)
    assert perturbed.dtype == torch.float64
    delta_rows = (perturbed - features).permute(0, 2, 3, 1).reshape(-1, 8)
    expected = analytic_nll_gradient64(est, features.permute(0, 2, 3, 1).reshape(-1, 8))
    m = mask.reshape(-1)
    assert torch.allclose(
        delta_rows[m], 4.0 * expected[m] / expected[m].norm(dim=1, keepdim=True), atol=1e-12, rtol=0
    )
    assert torch.equal(delta_rows[~m], torch.zeros_like(delta_rows[~m]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_keep_their_dtype_and_move_by_the_float32_step(dtype):
    est = FlowDensityEstimator(8, 3, hidden_dim=16, seed=0)
    ddfp = DensityDescendingPerturbation(est, eps=4.0)
    features = torch.randn(2, 8, 4, 4).to(dtype)
    perturbed = ddfp(features)
    assert perturbed.dtype == dtype
    step32 = (ddfp(features.float()) - features.float()).permute(0, 2, 3, 1).reshape(-1, 8)
    step = (perturbed.float() - features.float()).permute(0, 2, 3, 1).reshape(-1, 8)
    # The step is rounded to the features' precision (8 bits of mantissa for bfloat16).
    assert torch.cosine_similarity(step, step32, dim=1).min() > 0.99
    assert torch.allclose(step.norm(dim=1), torch.full((32,), 4.0), rtol=0.05)


def test_half_precision_estimator_in_the_perturbation_is_a_clear_value_error():
    ddfp = DensityDescendingPerturbation(FlowDensityEstimator(8, 3, hidden_dim=16, seed=0).half())
    with pytest.raises(ValueError, match="keep the estimator in float32"):
        ddfp(torch.randn(2, 8, 4, 4))
