"""How local and how random is DDFP's direction? Read off a trained DDFP run of the example loop.

The direction study (:mod:`studies.ddfp_direction_study`) asks which direction rule trains best;
this probe explains its numbers. On unlabelled training images it runs the loop's forward pass as
in training (every layer in train mode), takes the confident mask as the loop does, and measures
on the decoder input ``v`` of the weak view:

- the raw gradient ``g = d/dv sum_masked -log p(head(v))`` per pixel, with the head's Dropout off,
  computed here with plain autograd: the share of pixels whose norm is below ``r`` times the
  median over the masked pixels, i.e. the pixels that ``--ddfp-min-grad-ratio r`` holds still,
  among all, the masked and the unmasked pixels, and the ratio of the unmasked pixels' median
  norm to the masked pixels' (how far BatchNorm's batch statistics spread the gradient);
- the same shares from the library (:func:`ddfp_lib.perturbations.density_descent_direction` with
  ``head_mode="batch_stats"``, pixels with a zero direction): a second computation of the first;
- how random the reference direction is: the per-pixel cosine between two calls with the head as
  in training (Dropout on, ``head_mode="as_is"``), and between one such call and the direction
  without Dropout, over the masked pixels.

    python -m studies.ddfp_gradient_probe --checkpoint runs/ddfp_direction_study/ddfp_default/n120/seed1/latest.pt

Writes ``benchmarks/results/ddfp_gradient_probe.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from benchmarks.common import write_results  # noqa: E402

__all__ = ["RESULTS_NAME", "main", "parse_args", "probe"]

RESULTS_NAME = "ddfp_gradient_probe"
DEFAULT_RATIOS = (0.02, 0.1, 0.3, 0.5)


def _share(values: Tensor) -> float | None:
    """The share of True entries; None for no entries (JSON has no NaN)."""
    return float(values.float().mean()) if values.numel() else None


def _median(values: Tensor) -> float | None:
    return float(values.median()) if values.numel() else None


def _text(value: float | None, scale: float = 100.0, digits: int = 2) -> str:
    return "-" if value is None else f"{scale * value:.{digits}f}"


def probe(
    model: nn.Module,
    estimator: Any,
    images: Tensor,
    threshold: float,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
) -> dict[str, Any]:
    """The probe's numbers for one batch of images (see the module docstring).

    Args:
        model: the example loop's DeepLabV3+ (``encode``, ``decoder_input``, ``head``,
            ``classifier``, ``upsample``); it is put in train mode, as in the loop's forward pass,
            and its weights are not changed (BatchNorm's running statistics are restored).
        estimator: the run's :class:`ddfp_lib.FlowDensityEstimator` of the head's output.
        images: ``(B, 3, H, W)`` normalised images, the weak view of an unlabelled batch.
        threshold: confidence at or above which a pixel drives DDFP (the loop's ``--threshold``).
        ratios: the ``--ddfp-min-grad-ratio`` values to read off.
        seed: seeds the head's Dropout (in the forward pass and the two ``"as_is"`` calls); the
            global RNG state is restored afterwards.

    Returns:
        ``confident_fraction``, ``pixels``, ``unmasked_to_masked_median_norm``, ``ratios`` (one
        row per ratio: the shares held still among all, masked and unmasked pixels, by autograd
        and by the library) and ``cosine`` (median and minimum over the masked pixels).
    """
    from ddfp_lib.perturbations import density_descent_direction

    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model.train()
    try:
        with torch.no_grad():
            low, high = model.encode(images)
            v = model.decoder_input(low, high)
            logits = model.upsample(model.classifier(model.head(v)), images.shape[-2:])
            confidence = logits.softmax(dim=1).amax(dim=1)
        mask = F.interpolate(
            (confidence >= threshold)[:, None].float(), size=v.shape[-2:], mode="nearest"
        )[:, 0].bool()
        head = model.head
        dropouts = [m for m in head.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        for module in dropouts:
            module.eval()
        leaf = v.detach().requires_grad_(True)
        mapped = head(leaf)
        rows = mapped.permute(0, 2, 3, 1).reshape(-1, mapped.shape[1])
        nll = -estimator.log_prob_rows(rows)[mask.reshape(-1)].sum()
        (gradient,) = torch.autograd.grad(nll, leaf)
        for module in dropouts:
            module.train()
        norms = gradient.norm(dim=1)
        median = _median(norms[mask])
        outside = _median(norms[~mask])
        no_dropout = density_descent_direction(estimator, v, head, mask, head_mode="batch_stats")
        first = density_descent_direction(estimator, v, head, mask, head_mode="as_is")
        second = density_descent_direction(estimator, v, head, mask, head_mode="as_is")
        rows_table = []
        for ratio in ratios:
            still = norms < ratio * (float("inf") if median is None else median)
            library = density_descent_direction(
                estimator, v, head, mask, head_mode="batch_stats", min_grad_ratio=ratio
            )
            library_still = library.norm(dim=1) == 0
            rows_table.append(
                {
                    "min_grad_ratio": ratio,
                    "held_still": _share(still),
                    "held_still_masked": _share(still[mask]),
                    "held_still_unmasked": _share(still[~mask]),
                    "held_still_library": _share(library_still),
                    "held_still_library_masked": _share(library_still[mask]),
                    "held_still_library_unmasked": _share(library_still[~mask]),
                }
            )

        def cosine(a: Tensor, b: Tensor) -> dict[str, float | None]:
            values = F.cosine_similarity(a, b, dim=1)[mask]
            return {
                "median": _median(values),
                "min": float(values.min()) if values.numel() else None,
            }

        return {
            "feature_shape": list(v.shape),
            "pixels": int(mask.numel()),
            "confident_fraction": _share(mask),
            "unmasked_to_masked_median_norm": None
            if median is None or outside is None
            else outside / median,
            "ratios": rows_table,
            "cosine": {
                "as_is_vs_as_is": cosine(first, second),
                "as_is_vs_no_dropout": cosine(first, no_dropout),
            },
        }
    finally:
        torch.random.set_rng_state(generator_state)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
        model.eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a DDFP run's latest.pt")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="default: the run's own --data-root"
    )
    parser.add_argument("--images", type=int, default=16, help="unlabelled images in the batch")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="default: benchmarks/results"
    )
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    if not all(r > 0 for r in args.ratios):
        parser.error(f"--ratios must be > 0, got {args.ratios}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Probe the checkpoint and write the JSON; return its ``"results"``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ddfp_examples.datasets import SemiSegDataset, read_split_file
    from predict import load_trained_model

    trained = load_trained_model(args.checkpoint)
    if trained.estimator is None:
        raise ValueError(f"{args.checkpoint} holds no flow: probe a run with --fp ddfp or both")
    run_args = trained.args
    data_root = Path(args.data_root or run_args["data_root"])
    split = data_root / "splits" / "train.txt"
    lines = read_split_file(split)[: args.images]
    dataset = SemiSegDataset(
        data_root, lines, "val", crop_size=None, num_classes=trained.spec.num_classes
    )
    images = torch.stack([dataset[i][0] for i in range(len(lines))])
    threshold = float(run_args.get("threshold", 0.95))
    numbers = probe(trained.model, trained.estimator, images, threshold, args.ratios, args.seed)
    results = {
        "setup": {
            "checkpoint": str(args.checkpoint),
            "data_root": str(data_root),
            "images": len(lines),
            "image_size": list(images.shape[-2:]),
            "threshold": threshold,
            "seed": args.seed,
        },
        **numbers,
    }
    path = write_results(RESULTS_NAME, results, args.results_dir)
    print(
        f"confident pixels {_text(numbers['confident_fraction'], digits=1)} %; unmasked/masked "
        f"median gradient norm {_text(numbers['unmasked_to_masked_median_norm'], 1, 3)}"
    )
    for row in numbers["ratios"]:
        print(
            f"min_grad_ratio {row['min_grad_ratio']:<5} holds still {_text(row['held_still'])} %"
            f" of the pixels ({_text(row['held_still_masked'])} % of the masked, "
            f"{_text(row['held_still_unmasked'])} % of the others; library "
            f"{_text(row['held_still_library'])} %)"
        )
    cos = numbers["cosine"]
    print(
        f"cosine of two reference directions: median "
        f"{_text(cos['as_is_vs_as_is']['median'], 1, 3)}, min "
        f"{_text(cos['as_is_vs_as_is']['min'], 1, 3)}; against no Dropout: median "
        f"{_text(cos['as_is_vs_no_dropout']['median'], 1, 3)}"
    )
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
