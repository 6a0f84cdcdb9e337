"""DDFP on a 2-D toy: two moons as the features of a small classifier.

A handful of points are labelled, the rest are not. The points play the role of the head features
``h``: a normalizing flow (``FlowDensityEstimator(dim=2)``) learns their density online with
``OnlineFlowTrainer``, and ``DensityDescendingPerturbation`` pushes every confidently pseudo-labelled
point one step of length ``eps`` down that density. A small MLP classifier is first trained on the
labelled points only ("before"), then with the consistency loss on the pushed unlabelled points
("after"): keeping its prediction for the pushed points moves its decision boundary out of the dense
moons and into the low-density gap between them.

    python examples/density_2d.py                       # writes docs/assets/density_2d.png
    python examples/density_2d.py --dataset blobs --out /tmp/blobs.png

Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddfp_lib import (
    UNKNOWN_CLASS,
    ConsistencyLoss,
    DensityDescendingPerturbation,
    FlowDensityEstimator,
    OnlineFlowTrainer,
    RandomDirectionPerturbation,
)

__all__ = [
    "DATASETS",
    "ToyData",
    "boundary_log_density",
    "main",
    "make_blobs",
    "make_two_moons",
    "run",
    "train_consistency",
    "train_supervised",
]

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "assets" / "density_2d.png"
CLASS_COLOURS = ("#1f77b4", "#d62728", "#2ca02c")


class ToyData:
    """Points of a 2-D toy problem with a few labelled ones.

    Args:
        points: all training points.
        classes: the true class of every training point.
        labeled: which training points are labelled.
        test_points: held-out points for the accuracy.
        test_classes: their true classes.
        num_classes: K.

    Shape:
        - points: ``(N, 2)``; classes, labeled: ``(N,)``
        - test_points: ``(M, 2)``; test_classes: ``(M,)``
    """

    def __init__(
        self,
        points: torch.Tensor,
        classes: torch.Tensor,
        labeled: torch.Tensor,
        test_points: torch.Tensor,
        test_classes: torch.Tensor,
        num_classes: int,
    ):
        if points.dim() != 2 or points.shape[1] != 2:
            raise ValueError(f"points must be (N, 2), got {tuple(points.shape)}")
        if classes.shape != points.shape[:1] or labeled.shape != points.shape[:1]:
            raise ValueError("classes and labeled must have one entry per point")
        self.points = points
        self.classes = classes
        self.labeled = labeled
        self.test_points = test_points
        self.test_classes = test_classes
        self.num_classes = num_classes

    def flow_labels(self) -> torch.Tensor:
        """The labels the flow trains with: the class of labelled points, unknown for the rest."""
        return torch.where(self.labeled, self.classes, torch.full_like(self.classes, UNKNOWN_CLASS))


def _moons(
    count: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.arange(count) % 2
    angle = math.pi * torch.rand(count, generator=generator)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower = torch.stack([1.0 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    points = torch.where(classes[:, None] == 0, upper, lower)
    points = points + noise * torch.randn(count, 2, generator=generator)
    # Centred on the origin so that the flow's N(0, I) mixture means start near the data.
    return points - torch.tensor([0.5, 0.25]), classes


def _blobs(
    count: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.arange(count) % 3
    angle = 2.0 * math.pi * classes.float() / 3.0 + math.pi / 2.0
    centres = 1.4 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + (0.35 + noise) * torch.randn(count, 2, generator=generator), classes


def _toy(
    sampler: Any,
    num_classes: int,
    num_points: int,
    labeled_per_class: int,
    noise: float,
    seed: int,
) -> ToyData:
    generator = torch.Generator().manual_seed(seed)
    points, classes = sampler(num_points, noise, generator)
    test_points, test_classes = sampler(num_points, noise, generator)
    labeled = torch.zeros(num_points, dtype=torch.bool)
    for k in range(num_classes):
        members = torch.nonzero(classes == k).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:labeled_per_class]]
        labeled[chosen] = True
    return ToyData(points, classes, labeled, test_points, test_classes, num_classes)


def make_two_moons(
    num_points: int = 600, labeled_per_class: int = 3, noise: float = 0.1, seed: int = 0
) -> ToyData:
    """Two interleaved half circles, half of the points in each, with Gaussian jitter ``noise``."""
    return _toy(_moons, 2, num_points, labeled_per_class, noise, seed)


def make_blobs(
    num_points: int = 600, labeled_per_class: int = 3, noise: float = 0.1, seed: int = 0
) -> ToyData:
    """Three Gaussian blobs on a circle of radius 1.4, standard deviation ``0.35 + noise``."""
    return _toy(_blobs, 3, num_points, labeled_per_class, noise, seed)


DATASETS = {"moons": make_two_moons, "blobs": make_blobs}


def as_feature_map(points: torch.Tensor) -> torch.Tensor:
    """Rows ``(N, 2)`` as the ``(1, 2, N, 1)`` feature map that ``OnlineFlowTrainer`` takes."""
    return points.t()[None, :, :, None]


def as_label_map(labels: torch.Tensor) -> torch.Tensor:
    """Per-point labels ``(N,)`` as the ``(1, N, 1)`` label map that goes with :func:`as_feature_map`."""
    return labels[None, :, None]


def build_classifier(num_classes: int, hidden: int = 32) -> nn.Sequential:
    """The small classifier whose input features the toy perturbs: 2 -> hidden -> hidden -> K."""
    return nn.Sequential(
        nn.Linear(2, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, num_classes),
    )


def as_logit_map(logits: torch.Tensor) -> torch.Tensor:
    """Per-point logits ``(N, K)`` as ``(1, K, N, 1)``, the layout ConsistencyLoss reads."""
    return logits.t()[None, :, :, None]


def accuracy(classifier: nn.Module, points: torch.Tensor, classes: torch.Tensor) -> float:
    with torch.no_grad():
        return float((classifier(points).argmax(dim=1) == classes).float().mean())


def grid(
    points: torch.Tensor, steps: int, margin: float = 0.6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``steps x steps`` grid covering the points: returns xx, yy ``(steps, steps)`` and rows ``(steps**2, 2)``."""
    low = points.min(dim=0).values - margin
    high = points.max(dim=0).values + margin
    xs = torch.linspace(float(low[0]), float(high[0]), steps)
    ys = torch.linspace(float(low[1]), float(high[1]), steps)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return xx, yy, torch.stack([xx.flatten(), yy.flatten()], dim=1)


def boundary_log_density(
    classifier: nn.Module, estimator: FlowDensityEstimator, rows: torch.Tensor, width: float = 0.1
) -> float:
    """Mean learned log-density of the grid rows that lie on the decision boundary.

    A row is on the boundary when its two largest class probabilities differ by less than
    ``width``; the lower this number, the more the boundary runs through rare features.
    """
    with torch.no_grad():
        top2 = classifier(rows).softmax(dim=1).topk(2, dim=1).values
        on_boundary = (top2[:, 0] - top2[:, 1]) < width
        if not bool(on_boundary.any()):
            return float("nan")
        return float(estimator.log_prob(rows[on_boundary]).mean())


def train_supervised(
    classifier: nn.Module, x_l: torch.Tensor, y_l: torch.Tensor, steps: int, lr: float = 1e-2
) -> None:
    """``steps`` Adam steps of cross-entropy on the labelled points only."""
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(classifier(x_l), y_l)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_consistency(
    classifier: nn.Module,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    x_u: torch.Tensor,
    perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    threshold: float,
    after_step: Callable[[], object] | None = None,
    lr: float = 1e-2,
) -> None:
    """``steps`` Adam steps of ``CE(labelled) + ConsistencyLoss(f(perturb(x_u)), f(x_u))``.

    Args:
        classifier: the classifier f, trained in place.
        x_l: labelled points; y_l: their classes.
        x_u: unlabelled points.
        perturb: ``(points, confident_mask) -> perturbed points``.
        steps: optimisation steps.
        threshold: confidence from which a pseudo-label counts.
        after_step: called after every step (the flow's online update).
        lr: Adam learning rate.

    Shape:
        - x_l: ``(L, 2)``, y_l: ``(L,)``, x_u: ``(U, 2)``
    """
    consistency = ConsistencyLoss(threshold=threshold)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    for _ in range(steps):
        teacher = classifier(x_u).detach()
        confident = teacher.softmax(dim=1).amax(dim=1) >= threshold
        x_perturbed = perturb(x_u, confident)
        loss = F.cross_entropy(classifier(x_l), y_l) + consistency(
            as_logit_map(classifier(x_perturbed)), as_logit_map(teacher)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def run(
    dataset: str = "moons",
    flow_steps: int = 400,
    supervised_steps: int = 300,
    consistency_steps: int = 300,
    eps: float = 0.3,
    threshold: float = 0.95,
    seed: int = 0,
    out: Path | None = DEFAULT_OUT,
    grid_steps: int = 200,
    controls: bool = True,
) -> dict[str, Any]:
    """Train the flow and the classifier on the toy, draw the figure, return what it shows.

    1. ``flow_steps`` online steps of the flow on all points (labelled ones with their class);
    2. ``supervised_steps`` of the classifier on the labelled points only: the "before" boundary;
    3. from there, ``consistency_steps`` of supervised loss + consistency loss on the DDFP-pushed
       unlabelled points, the flow training on alongside: the "after" boundary;
    4. with ``controls``, the same steps from the same "before" classifier with the unlabelled
       points left where they are (plain pseudo-labelling) and pushed by ``eps`` in random
       directions (DDFP's step without the density).

    Args:
        dataset: "moons" (2 classes) or "blobs" (3 classes).
        flow_steps: flow steps before the classifier trains.
        supervised_steps: classifier steps on the labelled points.
        consistency_steps: classifier steps with the consistency term.
        eps: length of every perturbation.
        threshold: pseudo-label confidence above which a point is perturbed and learned.
        seed: seeds the data, the flow, the classifier and the random directions.
        out: PNG path; None skips the figure (and matplotlib).
        grid_steps: resolution of the density and boundary grid.
        controls: also train the two controls.

    Returns:
        ``flow_nll_start`` / ``flow_nll_end`` (mean NLL of the points, nats),
        ``confident_fraction``, ``descending_fraction`` (share of the confident points with
        ``log p(x + delta) < log p(x)``), ``mean_log_density_drop``; held-out accuracies
        ``accuracy_before``, ``accuracy_after`` (DDFP) and, with controls,
        ``accuracy_after_pseudo_labels`` and ``accuracy_after_random_direction``;
        ``boundary_log_density_before`` / ``_after`` (see :func:`boundary_log_density`) and
        ``png`` (the path written, or None).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    threads = torch.get_num_threads()
    # Tensors of a few hundred rows: extra threads only add synchronisation (10-30x slower on a
    # loaded 2-core machine).
    torch.set_num_threads(1)
    try:
        return _run(
            dataset,
            flow_steps,
            supervised_steps,
            consistency_steps,
            eps,
            threshold,
            seed,
            out,
            grid_steps,
            controls,
        )
    finally:
        torch.set_num_threads(threads)


def _run(
    dataset: str,
    flow_steps: int,
    supervised_steps: int,
    consistency_steps: int,
    eps: float,
    threshold: float,
    seed: int,
    out: Path | None,
    grid_steps: int,
    controls: bool,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    data = DATASETS[dataset](seed=seed)
    points, labels = data.points, data.flow_labels()
    x_l, y_l = points[data.labeled], data.classes[data.labeled]
    x_u = points[~data.labeled]

    estimator = FlowDensityEstimator(dim=2, num_classes=data.num_classes, hidden_dim=64, seed=seed)
    flow_trainer = OnlineFlowTrainer(
        estimator, lr=3e-3, total_steps=flow_steps + consistency_steps, noise_std=0.02
    )

    def flow_step() -> torch.Tensor:
        return flow_trainer.step(as_feature_map(points), as_label_map(labels))

    with torch.no_grad():
        flow_nll_start = float(estimator.nll(points))
    for _ in range(flow_steps):
        flow_step()

    before = build_classifier(data.num_classes)
    train_supervised(before, x_l, y_l, supervised_steps)

    def trained_from_before(perturb: Callable, after_step: Callable | None = None) -> nn.Module:
        classifier = build_classifier(data.num_classes)
        classifier.load_state_dict(before.state_dict())
        train_consistency(
            classifier, x_l, y_l, x_u, perturb, consistency_steps, threshold, after_step
        )
        return classifier

    ddfp = DensityDescendingPerturbation(estimator, eps=eps)
    after = trained_from_before(lambda x, confident: ddfp(x, mask=confident), flow_step)
    results: dict[str, Any] = {
        "accuracy_before": accuracy(before, data.test_points, data.test_classes)
    }
    results["accuracy_after"] = accuracy(after, data.test_points, data.test_classes)
    if controls:
        random_direction = RandomDirectionPerturbation(eps=eps)
        generator = torch.Generator().manual_seed(seed)
        for name, perturb in (
            ("pseudo_labels", lambda x, confident: x),
            (
                "random_direction",
                lambda x, confident: random_direction(x, mask=confident, generator=generator),
            ),
        ):
            control = trained_from_before(perturb)
            results[f"accuracy_after_{name}"] = accuracy(
                control, data.test_points, data.test_classes
            )

    with torch.no_grad():
        flow_nll_end = float(estimator.nll(points))
        confident = after(x_u).softmax(dim=1).amax(dim=1) >= threshold
    x_ddfp = ddfp(x_u, mask=confident)
    with torch.no_grad():
        drop = estimator.log_prob(x_u) - estimator.log_prob(x_ddfp)
    xx, yy, rows = grid(points, grid_steps)
    any_confident = bool(confident.any())
    results.update(
        {
            "flow_nll_start": flow_nll_start,
            "flow_nll_end": flow_nll_end,
            "confident_fraction": float(confident.float().mean()),
            "descending_fraction": float((drop[confident] > 0).float().mean())
            if any_confident
            else float("nan"),
            "mean_log_density_drop": float(drop[confident].mean())
            if any_confident
            else float("nan"),
            "boundary_log_density_before": boundary_log_density(before, estimator, rows),
            "boundary_log_density_after": boundary_log_density(after, estimator, rows),
            "png": None,
        }
    )
    if out is not None:
        figure_data = {
            "data": data,
            "estimator": estimator,
            "classifiers": (before, after),
            "x_u": x_u,
            "x_ddfp": x_ddfp.detach(),
            "confident": confident,
            "grid": (xx, yy, rows),
        }
        results["png"] = str(draw(figure_data, results, Path(out)))
    return results


def draw(figure_data: dict[str, Any], results: dict[str, Any], out: Path) -> Path:
    """Three panels: density and DDFP arrows; boundary before; boundary after consistency training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data: ToyData = figure_data["data"]
    estimator: FlowDensityEstimator = figure_data["estimator"]
    xx, yy, rows = figure_data["grid"]
    with torch.no_grad():
        log_density = estimator.log_prob(rows).reshape(xx.shape).numpy()
        predictions = [
            c(rows).argmax(dim=1).reshape(xx.shape).numpy() for c in figure_data["classifiers"]
        ]
    top = float(log_density.max())
    density_levels = [top - 6.0 + 0.5 * i for i in range(13)]
    xx, yy = xx.numpy(), yy.numpy()
    points, classes, labeled = data.points.numpy(), data.classes.numpy(), data.labeled.numpy()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharex=True, sharey=True)
    for ax in axes:
        ax.contourf(xx, yy, log_density, levels=density_levels, cmap="Greys", extend="min")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])

    ax = axes[0]
    x_u = figure_data["x_u"].numpy()
    delta = (figure_data["x_ddfp"] - figure_data["x_u"]).numpy()
    shown = figure_data["confident"].nonzero().flatten()[::3].numpy()
    ax.scatter(x_u[:, 0], x_u[:, 1], s=4, c="#777777", label="unlabelled")
    ax.quiver(
        x_u[shown, 0], x_u[shown, 1], delta[shown, 0], delta[shown, 1],
        angles="xy", scale_units="xy", scale=1.0, width=0.003, color="#ff7f0e",
        label="DDFP step of confident points",
    )  # fmt: skip
    ax.set_title(
        f"learned log-density and DDFP arrows\n{100 * results['descending_fraction']:.0f}% of "
        "arrows end at a lower density"
    )
    ax.legend(loc="lower left", fontsize=8)

    after = f"after: + DDFP consistency, test accuracy {100 * results['accuracy_after']:.1f}%"
    if "accuracy_after_pseudo_labels" in results:
        after += (
            f"\nsame steps with pseudo-labels alone {100 * results['accuracy_after_pseudo_labels']:.1f}%,"
            f"\nwith random directions {100 * results['accuracy_after_random_direction']:.1f}%"
        )
    titles = (
        f"before: labelled points only\ntest accuracy {100 * results['accuracy_before']:.1f}%\n",
        after,
    )
    for ax, prediction, title in zip(axes[1:], predictions, titles):
        ax.contour(
            xx, yy, prediction, levels=[k + 0.5 for k in range(data.num_classes - 1)],
            colors="k", linewidths=2.0,
        )  # fmt: skip
        for k in range(data.num_classes):
            members = (classes == k) & ~labeled
            ax.scatter(points[members, 0], points[members, 1], s=4, c=CLASS_COLOURS[k], alpha=0.4)
            chosen = (classes == k) & labeled
            ax.scatter(
                points[chosen, 0], points[chosen, 1], s=90, c=CLASS_COLOURS[k],
                edgecolors="k", marker="*", label=f"labelled, class {k}",
            )  # fmt: skip
        ax.set_title(title)
    axes[1].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="moons")
    parser.add_argument("--flow-steps", type=int, default=400)
    parser.add_argument("--supervised-steps", type=int, default=300)
    parser.add_argument("--consistency-steps", type=int, default=300)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    args = parser.parse_args(argv)
    results = run(
        args.dataset,
        args.flow_steps,
        args.supervised_steps,
        args.consistency_steps,
        eps=args.eps,
        seed=args.seed,
        out=args.out,
    )
    for key, value in results.items():
        print(f"{key:>28}: {value:.4f}" if isinstance(value, float) else f"{key:>28}: {value}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
