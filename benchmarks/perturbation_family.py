"""Cost of one call of every feature perturbation at DeepLabV3+ decoder size.

Features ``v`` are ``(B, 304, 81, 81)`` (a 321 crop at stride 4). DDFP's head is the DeepLabV3+ fuse
block conv3x3(304->256)-BN-ReLU-Dropout-conv3x3(256->256)-BN-ReLU-Dropout with a 256-d, 21-class
flow; VAT's head is that block followed by the 1x1 classifier. The other perturbations use no head.
The head's forward pass and every perturbation are timed in ``--repeats`` rounds, in turns, each
timed call after an untimed one (:func:`benchmarks.common.interleaved`); the median is reported.

    python benchmarks/perturbation_family.py                 # CPU, default sizes
    python benchmarks/perturbation_family.py --repeats 3 --only ddfp vat
    python benchmarks/perturbation_family.py --vat-precision   # VAT's float32 accuracy by xi

Writes ``benchmarks/results/perturbation_family_<device>.json`` (machine, torch version, command,
every time) and prints a table; ``--vat-precision`` writes ``vat_precision_cpu.json`` instead.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fuse_block, interleaved, make_timer  # noqa: E402
from ddfp_lib import FlowDensityEstimator, available_perturbations, build_perturbation
from ddfp_lib.perturbations import virtual_adversarial_direction

__all__ = ["main", "run_timings", "vat_precision"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def vat_precision(features: torch.Tensor, head: nn.Module, xis: list[float]) -> dict[str, float]:
    """Cosine between VAT's float32 direction at each ``xi`` and the float64 direction at 1e-6."""
    reference_head = copy.deepcopy(head).double().eval()
    float_head = copy.deepcopy(head).eval()
    reference = virtual_adversarial_direction(
        features.double(), reference_head, 1e-6, generator=torch.Generator().manual_seed(0)
    )
    cosines = {}
    for xi in xis:
        direction = virtual_adversarial_direction(
            features, float_head, xi, generator=torch.Generator().manual_seed(0)
        )
        cosine = torch.cosine_similarity(direction.flatten().double(), reference.flatten(), dim=0)
        cosines[f"{xi:g}"] = round(float(cosine), 4)
    return cosines


def machine_description(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=304, help="channels of v")
    parser.add_argument("--size", type=int, default=81, help="height and width of v")
    parser.add_argument("--head-channels", type=int, default=256, help="channels of h")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", choices=available_perturbations(), default=None)
    parser.add_argument(
        "--vat-precision",
        action="store_true",
        help="instead of timing, compare VAT's float32 direction on the first image with the "
        "float64 one for several xi (CPU; writes results/vat_precision_cpu.json)",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: results/)")
    return parser.parse_args(argv)


def run_timings(
    args: argparse.Namespace, features: torch.Tensor, heads: dict[str, nn.Module], options: dict
) -> list[dict[str, Any]]:
    """Median seconds per call of the head's forward pass and of every selected perturbation."""
    reference = "head forward (reference)"
    calls = {reference: functools.partial(heads["ddfp"], features)}
    rows = {reference: {"name": reference}}
    for name in args.only or available_perturbations():
        perturbation = build_perturbation(name, **options.get(name, {}))
        generator = torch.Generator(device=features.device).manual_seed(0)
        calls[name] = functools.partial(
            perturbation, features, head=heads.get(name), generator=generator
        )
        rows[name] = {"name": name, "repr": repr(perturbation)}
    timers = {name: make_timer(call, features.device) for name, call in calls.items()}
    measured = interleaved(timers, args.repeats)
    for name, row in rows.items():
        row["times_s"] = list(measured[name].times)
        row["median_s"] = measured[name].median
        row["head_forwards"] = measured[name].median / measured[reference].median
    return list(rows.values())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.vat_precision else args.device)
    torch.manual_seed(0)
    features = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    head = fuse_block(args.channels, args.head_channels).to(device).train()
    classifier = nn.Conv2d(args.head_channels, args.num_classes, 1).to(device)
    estimator = FlowDensityEstimator(args.head_channels, args.num_classes, seed=0).to(device)
    heads: dict[str, nn.Module] = {"ddfp": head, "vat": nn.Sequential(head, classifier)}
    result: dict[str, Any] = {
        "benchmark": "vat_precision" if args.vat_precision else "perturbation_family",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(device),
        "features_shape": list(features.shape),
        "head": "conv3x3-BN-ReLU-Dropout2d(0.1) x2, +1x1 classifier for vat",
    }
    if args.vat_precision:
        xis = [1e-6, 1e-4, 1e-3, 1e-2, 1e-1]
        result["cosine_by_xi"] = vat_precision(features[:1], heads["vat"], xis)
        print("VAT float32 direction vs float64 (cosine) by xi:", result["cosine_by_xi"])
        default_output = RESULTS_DIR / "vat_precision_cpu.json"
    else:
        rows = run_timings(args, features, heads, {"ddfp": {"estimator": estimator}})
        result.update(repeats=args.repeats, results=rows)
        print(
            f"features {tuple(features.shape)} on {device}, {torch.get_num_threads()} threads, "
            f"median of {args.repeats}"
        )
        print(f"{'perturbation':<26}{'median [s]':>12}{'x head fwd':>12}")
        for row in rows:
            print(f"{row['name']:<26}{row['median_s']:>12.4f}{row['head_forwards']:>12.2f}")
        default_output = RESULTS_DIR / f"perturbation_family_{device.type}.json"
    output = args.output or default_output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {output}")
    return result


if __name__ == "__main__":
    main()
