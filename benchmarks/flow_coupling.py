"""Glow coupling implementations on one task: ``log p(x)`` and its input gradient.

Flows compared (D=256, 2 blocks, subnets Linear(128,256)-ReLU-Linear(256,256)-ReLU-Linear(256,256),
a fixed permutation after each block, the same Gaussian-mixture prior ``ddfp_lib.distributions``):

- ``ddfp_lib``: ``ddfp_lib.flows.GlowCoupling`` (contiguous halves by slicing, one subnet per half);
- ``ddfp_lib_chunked``: the same flow evaluated in 16,384-row chunks (rows are independent);
- ``freia``: FrEIA ``GLOWCouplingBlock`` + ``PermuteRandom`` in a ``GraphINN``, with weights copied
  from ddfp_lib's so both compute the same function (checked in float64);
- ``nflows``: the nearest stock equivalent of a Glow block, two ``AffineCouplingTransform`` with
  complementary masks (first half from the second, then second half from the new first half) and
  ``Permutation``. Its couplings gather and scatter halves by index and scale with
  ``sigmoid(u + 2) + 1e-3`` instead of ``exp(clamp * 0.636 * atan(u / clamp))``: the same shapes,
  subnets (weights copied, shift and scale rows swapped to nflows' order) and FLOPs, a different
  scale law.

All flows are timed in turns in one process (``torch.utils.benchmark``, see
:func:`benchmarks.common.interleaved`), so they share whatever else loads the machine.

Usage::

    python -m benchmarks.flow_coupling
    python -m benchmarks.flow_coupling --rows 20480 131072 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import benchmark

from benchmarks.common import interleaved, make_timer, summary, write_results

__all__ = ["FLOWS", "build_flows", "flow_log_prob_gradient", "main", "nflows_glow_block"]

FLOWS = ("ddfp_lib", "ddfp_lib_chunked", "freia", "nflows")
DIM = 256
HIDDEN = 256
NUM_CLASSES = 21
CHUNK_ROWS = 16384


class _ContextFreeSubnet(nn.Module):
    """Adapts a plain MLP to nflows' ``transform_net(inputs, context)`` call."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(inputs)


def _nflows_subnet(source: nn.Sequential, transformed: int) -> _ContextFreeSubnet:
    """Copy of a ddfp_lib subnet with its output rows reordered to nflows' (shift, scale)."""
    net = copy.deepcopy(source)
    with torch.no_grad():
        last = net[-1]
        order = torch.cat([torch.arange(transformed, 2 * transformed), torch.arange(transformed)])
        last.weight.copy_(last.weight[order])
        last.bias.copy_(last.bias[order])
    return _ContextFreeSubnet(net)


def nflows_glow_block(coupling: Any, permutation: torch.Tensor) -> list[Any]:
    """A Glow block from nflows' stock transforms, with the subnets of a ddfp_lib ``GlowCoupling``.

    Returns:
        ``[AffineCouplingTransform (first half), AffineCouplingTransform (second half),
        Permutation]``.
    """
    from nflows.transforms.coupling import AffineCouplingTransform
    from nflows.transforms.permutations import Permutation

    features, split = coupling.dim, coupling.split
    first_half = torch.cat([torch.ones(split), torch.zeros(features - split)])
    first_net = _nflows_subnet(coupling.subnet1, split)
    second_net = _nflows_subnet(coupling.subnet2, features - split)
    return [
        AffineCouplingTransform(first_half, lambda num_in, num_out: first_net),
        AffineCouplingTransform(1 - first_half, lambda num_in, num_out: second_net),
        Permutation(permutation.clone()),
    ]


def build_flows(seed: int = 0) -> dict[str, Any]:
    """The flows with shared weights, and the mixture means.

    Returns:
        ``{"ddfp_lib": transform, "freia": GraphINN, "nflows": transform, "means": (K, D)}``;
        each flow maps rows ``(N, D)`` to ``(z, log_det)``.
    """
    from nflows.transforms.base import CompositeTransform

    from benchmarks.reference_design import ReferenceDensity, copy_reference_flow
    from ddfp_lib import FlowDensityEstimator
    from ddfp_lib.flows import GlowCoupling

    reference = ReferenceDensity(DIM, NUM_CLASSES, 2, HIDDEN, seed=seed)
    estimator = FlowDensityEstimator(DIM, NUM_CLASSES, 2, HIDDEN, seed=seed + 1)
    copy_reference_flow(reference, estimator)
    parts = list(estimator.flow._transforms)
    stock = []
    for coupling, permutation in zip(parts[0::2], parts[1::2]):
        if not isinstance(coupling, GlowCoupling):
            raise ValueError("expected GlowCoupling / Permutation pairs")
        stock += nflows_glow_block(coupling, permutation._permutation)
    return {
        "ddfp_lib": estimator.flow,
        "freia": reference.inn,
        "nflows": CompositeTransform(stock),
        "means": estimator.means.detach().clone(),
    }


def flow_log_prob_gradient(
    flow: Callable[[torch.Tensor], tuple[Any, torch.Tensor]],
    means: torch.Tensor,
    x: torch.Tensor,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(x)`` under flow + mixture prior and ``d sum log p / dx``.

    Args:
        flow: maps rows to ``(z, log_det)``; FrEIA's tuple-of-tensors ``z`` is unwrapped.
        means: mixture means.
        x: feature rows.
        chunk_rows: evaluate this many rows at a time (None: all at once).

    Shape:
        - x: ``(N, D)``; means ``(K, D)``; returns ``(N,)`` and ``(N, D)``
    """
    from ddfp_lib.distributions import mixture_log_prob

    if x.dim() != 2 or means.dim() != 2 or x.shape[1] != means.shape[1]:
        raise ValueError(
            f"x must be (N, D) and means (K, D), got {tuple(x.shape)} and {tuple(means.shape)}"
        )
    step = chunk_rows or x.shape[0]
    log_probs, gradients = [], []
    for start in range(0, x.shape[0], step):
        with torch.enable_grad():
            rows = x[start : start + step].detach().requires_grad_(True)
            z, log_det = flow(rows)
            if isinstance(z, (tuple, list)):
                z = z[0]
            log_p = mixture_log_prob(z, means.to(z.dtype)) + log_det
            (gradient,) = torch.autograd.grad(log_p.sum(), rows)
        log_probs.append(log_p.detach())
        gradients.append(gradient)
    return torch.cat(log_probs), torch.cat(gradients)


def _agreement(flows: dict[str, Any]) -> dict[str, float]:
    """float64 agreement of FrEIA and nflows with ddfp_lib on 64 rows (weights are shared)."""
    x = torch.randn(64, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    means = flows["means"].double()
    report = {}
    base_p, base_g = flow_log_prob_gradient(flows["ddfp_lib"].double(), means, x)
    for name in ("freia", "nflows"):
        log_p, gradient = flow_log_prob_gradient(flows[name].double(), means, x)
        report[f"{name}_max_abs_log_p_difference"] = float((log_p - base_p).abs().max())
        report[f"{name}_max_abs_gradient_difference"] = float((gradient - base_g).abs().max())
    for name in ("ddfp_lib", "freia", "nflows"):
        flows[name].float()
    return report


def run(rows: list[int], repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Time every flow at every size, in turns, and summarise medians and ratios."""
    flows = build_flows()
    results: dict[str, Any] = {"agreement_float64": _agreement(flows), "sizes": []}
    log(f"float64 agreement with ddfp_lib: {results['agreement_float64']}")
    means = flows["means"]
    measured: list[benchmark.Measurement] = []
    for n in rows:
        load_before = list(os.getloadavg())
        x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(n))
        calls = {
            "ddfp_lib": partial(flow_log_prob_gradient, flows["ddfp_lib"], means, x),
            "ddfp_lib_chunked": partial(
                flow_log_prob_gradient, flows["ddfp_lib"], means, x, CHUNK_ROWS
            ),
            "freia": partial(flow_log_prob_gradient, flows["freia"], means, x),
            "nflows": partial(flow_log_prob_gradient, flows["nflows"], means, x),
        }
        labels = {"label": "log p(x) and its gradient", "sub_label": f"N={n}"}
        timers = {
            name: make_timer(call, description=name, **labels) for name, call in calls.items()
        }
        size = interleaved(timers, repeats)
        measured += size.values()
        time = {name: summary(measurement) for name, measurement in size.items()}
        base = time["ddfp_lib"]["median"]
        results["sizes"].append(
            {
                "rows": n,
                "time": time,
                "time_over_ddfp_lib": {name: time[name]["median"] / base for name in FLOWS},
                "load_average_before_after": [load_before, list(os.getloadavg())],
            }
        )
    log(str(benchmark.Compare(measured)))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write ``<results-dir>/<name>.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20480, 131072])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    parser.add_argument("--name", default="flow_coupling")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.rows, args.repeats, lambda message: print(message, flush=True))
    results["settings"] = {
        "dim": DIM,
        "hidden": HIDDEN,
        "num_blocks": 2,
        "num_classes": NUM_CLASSES,
        "chunk_rows": CHUNK_ROWS,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "device": "cpu",
    }
    command = [
        "python",
        "-m",
        "benchmarks.flow_coupling",
        *(sys.argv[1:] if argv is None else argv),
    ]
    path = write_results(args.name, results, args.results_dir, argv=command)
    print(f"wrote {path}", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
