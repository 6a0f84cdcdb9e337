"""Show what a trained UniMatch + DDFP model sees: predictions, confidence and the learned density.

One row per validation image of the run's dataset, in columns:

    image | ground truth | prediction | confidence | log p(h) | density drop

``log p(h)`` is the flow's log-density of the head features ``h`` at every pixel (stride 4), with the
confident pixels outlined; these are the pixels DDFP perturbs. The perturbation itself has norm
``eps`` on every confident pixel by construction, so the last column shows what it does instead:
the drop of the learned density ``log p(head(v)) - log p(head(v + delta))`` on the confident pixels.
Checkpoints of runs without a DDFP stream have no flow and get the first four columns only.

    python examples/visualize_predictions.py runs/unimatch_ddfp/best.pt --out predictions.png
    python examples/visualize_predictions.py best.pt --data-root VOC2012 --split splits/val.txt

Checkpoints are Python pickles: load only files you trust.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddfp_examples.datasets import (  # noqa: E402
    SemiSegDataset,
    read_split_file,
    scan_cityscapes_layout,
)
from ddfp_examples.runtime import DEVICES, select_device  # noqa: E402
from ddfp_examples.transforms import denormalize, voc_palette  # noqa: E402
from predict import TrainedModel, load_trained_model  # noqa: E402

from ddfp_lib import IGNORE_INDEX, DensityDescendingPerturbation, pseudo_labels  # noqa: E402

__all__ = [
    "analyse_image",
    "column_titles",
    "draw_grid",
    "main",
    "validation_samples",
    "visualize",
]


def validation_samples(
    trained: TrainedModel, data_root: Path | None = None, split: Path | None = None
) -> SemiSegDataset:
    """The validation set of the run: its own data root and list unless others are given.

    Args:
        trained: the loaded checkpoint.
        data_root: dataset root; default: the run's ``--data-root`` (the demo's cache for demo runs).
        split: split file of the images to show; default: the run's ``--val-list``, the demo's
            ``splits/val.txt``, or Cityscapes' ``val`` folder.
    """
    args = trained.args
    root = data_root or args.get("data_root")
    if root is None and args["dataset"] == "demo":
        from ddfp_examples.demo_data import default_demo_root

        root = default_demo_root()
    if root is None:
        raise ValueError("the checkpoint names no data root: pass --data-root")
    root = Path(root)
    lines: list[str]
    if split is not None:
        lines = read_split_file(split)
    elif args["dataset"] == "demo":
        lines = read_split_file(root / "splits" / "val.txt")
    elif args.get("val_list") is not None:
        lines = read_split_file(args["val_list"])
    elif args["dataset"] == "cityscapes":
        lines = scan_cityscapes_layout(root, "val")
    else:
        raise ValueError("the checkpoint names no validation list: pass --split")
    spec = trained.spec
    return SemiSegDataset(
        root, lines, "val", None, spec.num_classes, ignore_index=spec.ignore_index
    )


def analyse_image(
    trained: TrainedModel,
    image: torch.Tensor,
    threshold: float,
    eps: float,
) -> dict[str, torch.Tensor]:
    """Prediction, confidence and (with a flow) the learned density before and after DDFP.

    Args:
        trained: the loaded checkpoint.
        image: one normalised image.
        threshold: confidence of the pixels DDFP perturbs.
        eps: DDFP's step norm.

    Shape:
        - image: ``(3, H, W)``
        - returns ``prediction`` ``(H, W)`` long, ``confidence`` ``(H, W)``; with a flow also
          ``log_density``, ``log_density_pushed`` and ``confident`` ``(h, w)`` at stride 4
    """
    model, estimator = trained.model, trained.estimator
    with torch.no_grad():
        out = model.forward_features(image[None])
    confidence, prediction = pseudo_labels(out.logits)
    result = {"prediction": prediction[0], "confidence": confidence[0]}
    if estimator is None:
        return result
    confident = F.interpolate(
        (confidence >= threshold)[:, None].float(), size=out.v.shape[-2:], mode="nearest"
    )[:, 0].bool()
    ddfp = DensityDescendingPerturbation(estimator, eps=eps)
    v_ddfp = ddfp(out.v, head=model.head, mask=confident)
    with torch.no_grad():
        result["log_density"] = estimator.log_prob(out.h)[0]
        result["log_density_pushed"] = estimator.log_prob(model.head(v_ddfp))[0]
    result["confident"] = confident[0]
    return result


def _summary(analysis: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
    valid = mask != IGNORE_INDEX
    correct = (analysis["prediction"] == mask) & valid
    numbers = {"pixel_accuracy": float(correct.sum() / valid.sum().clamp_min(1))}
    if "log_density" in analysis:
        confident = analysis["confident"]
        drop = analysis["log_density"] - analysis["log_density_pushed"]
        numbers["confident_fraction"] = float(confident.float().mean())
        numbers["mean_log_density"] = float(analysis["log_density"].mean())
        if bool(confident.any()):
            numbers["mean_density_drop"] = float(drop[confident].mean())
            numbers["descending_fraction"] = float((drop[confident] > 0).float().mean())
    return numbers


def _colour(classes: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    return palette[classes.long().clamp(0, 255)]


def column_titles(threshold: float, with_flow: bool) -> list[str]:
    """The grid's columns: image, ground truth, prediction, confidence and, with a flow, the density."""
    titles = ["image", "ground truth", "prediction", f"confidence (contour {threshold:g})"]
    if with_flow:
        titles += ["learned log p(h)", "DDFP density drop"]
    return titles


def draw_grid(rows: list[dict[str, Any]], threshold: float, out: Path) -> Path:
    """One row per image, in the columns of :func:`column_titles`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = torch.tensor(voc_palette(), dtype=torch.uint8).reshape(256, 3)
    with_flow = "log_density" in rows[0]["analysis"]
    titles = column_titles(threshold, with_flow)
    fig, axes = plt.subplots(
        len(rows), len(titles), figsize=(2.6 * len(titles), 2.4 * len(rows)), squeeze=False
    )
    for axes_row, row in zip(axes, rows):
        analysis, mask = row["analysis"], row["mask"]
        picture = denormalize(row["image"])
        axes_row[0].imshow(picture.numpy())
        axes_row[0].set_ylabel(row["id"], fontsize=8)
        axes_row[1].imshow(_colour(mask, palette).numpy())
        axes_row[2].imshow(_colour(analysis["prediction"], palette).numpy())
        axes_row[2].set_xlabel(
            f"pixel acc. {100 * row['numbers']['pixel_accuracy']:.1f}%", fontsize=8
        )
        confidence = analysis["confidence"].numpy()
        axes_row[3].imshow(confidence, cmap="viridis", vmin=0.0, vmax=1.0)
        if float(confidence.min()) < threshold <= float(confidence.max()):
            axes_row[3].contour(confidence, levels=[threshold], colors="w", linewidths=0.8)
        if with_flow:
            confident = analysis["confident"]
            image = axes_row[4].imshow(analysis["log_density"].numpy(), cmap="magma")
            if 0.0 < float(confident.float().mean()) < 1.0:
                axes_row[4].contour(
                    confident.float().numpy(), levels=[0.5], colors="c", linewidths=0.8
                )
            fig.colorbar(image, ax=axes_row[4], fraction=0.046, pad=0.02)
            drop = analysis["log_density"] - analysis["log_density_pushed"]
            shown = torch.where(confident, drop, torch.full_like(drop, float("nan")))
            image = axes_row[5].imshow(shown.numpy(), cmap="inferno")
            fig.colorbar(image, ax=axes_row[5], fraction=0.046, pad=0.02)
            if "mean_density_drop" in row["numbers"]:
                axes_row[5].set_xlabel(
                    f"mean drop {row['numbers']['mean_density_drop']:.2f} nats", fontsize=8
                )
    for column, title in enumerate(titles):
        axes[0, column].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out


def visualize(
    checkpoint: str | Path,
    out: str | Path = "predictions.png",
    num_images: int = 4,
    data_root: Path | None = None,
    split: Path | None = None,
    threshold: float | None = None,
    eps: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Draw the grid for the first ``num_images`` images of the validation list.

    Args:
        checkpoint: ``best.pt`` / ``latest.pt`` of the example loop.
        out: PNG to write.
        num_images: rows of the grid.
        data_root: see :func:`validation_samples`.
        split: see :func:`validation_samples`.
        threshold: confidence of the perturbed pixels; default: the run's ``--threshold``.
        eps: DDFP's step norm; default: the run's ``--eps``.
        device: where the model runs.

    Returns:
        ``png`` (the path), ``has_flow``, ``columns`` (see :func:`column_titles`) and ``images``:
        per image its ``id``,
        ``prediction`` ``(H, W)`` and the numbers ``pixel_accuracy`` and, with a flow,
        ``confident_fraction``, ``mean_log_density``, ``mean_density_drop`` and
        ``descending_fraction`` (share of confident pixels whose learned density DDFP lowers).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    trained = load_trained_model(checkpoint, device)
    threshold = float(trained.args.get("threshold", 0.95) if threshold is None else threshold)
    eps = float(trained.args.get("eps", 4.0) if eps is None else eps)
    dataset = validation_samples(trained, data_root, split)
    rows = []
    for index in range(min(num_images, len(dataset))):
        image, mask, image_id = dataset[index]
        analysis = analyse_image(trained, image.to(device), threshold, eps)
        analysis = {k: v.cpu() for k, v in analysis.items()}
        rows.append(
            {
                "id": image_id,
                "image": image,
                "mask": mask,
                "analysis": analysis,
                "numbers": _summary(analysis, mask),
            }
        )
    png = draw_grid(rows, threshold, Path(out))
    return {
        "png": str(png),
        "has_flow": trained.estimator is not None,
        "columns": column_titles(threshold, trained.estimator is not None),
        "images": [
            {"id": row["id"], "prediction": row["analysis"]["prediction"], **row["numbers"]}
            for row in rows
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="best.pt / latest.pt of a training run")
    parser.add_argument("--out", type=Path, default=Path("predictions.png"), help="PNG to write")
    parser.add_argument("--num-images", type=int, default=4, help="rows of the grid")
    parser.add_argument("--data-root", type=Path, default=None, help="default: the run's")
    parser.add_argument("--split", type=Path, default=None, help="default: the run's val list")
    parser.add_argument("--threshold", type=float, default=None, help="default: the run's")
    parser.add_argument("--eps", type=float, default=None, help="default: the run's")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto = cuda, else mps, else cpu"
    )
    args = parser.parse_args(argv)
    device = select_device(args.device)
    result = visualize(
        args.checkpoint,
        args.out,
        args.num_images,
        args.data_root,
        args.split,
        args.threshold,
        args.eps,
        device,
    )
    for entry in result["images"]:
        numbers = ", ".join(
            f"{k} {v:.3f}" for k, v in entry.items() if k not in ("id", "prediction")
        )
        print(f"{entry['id']}: {numbers}")
    print(f"wrote {result['png']}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
