"""UniMatch + DDFP: semi-supervised semantic segmentation with DeepLabV3+.

One iteration, in the words of the papers:
  1. weak view u_w, two strong views u_s1/u_s2 (with CutMix boxes from a second unlabelled batch);
  2. pseudo-labels = argmax of the detached weak-view prediction, kept where confidence >= threshold;
  3. the strong views learn the (CutMix-mixed) pseudo-labels;
  4. feature perturbation streams on the weak view: UniMatch's dropout FP on the encoder features,
     and DDFP, which pushes the decoder input of confident pixels down the learned feature density;
  5. the flow that learns that density takes one online step on the detached head features.

Runs as it is on one CPU (the demo), on one GPU, or on many GPUs with torchrun:
  python examples/voc_unimatch_plus_ddfp.py                                  # demo data, CPU
  python examples/voc_unimatch_plus_ddfp.py --dataset voc --data-root VOC2012 \\
      --labeled-list splits/92/labeled.txt --unlabeled-list splits/92/unlabeled.txt \\
      --val-list splits/val.txt --backbone-weights pretrained/resnet101.pth --amp bf16
  torchrun --nproc_per_node=4 examples/voc_unimatch_plus_ddfp.py --dataset voc ...

The options and their presets per dataset and recipe are in ``ddfp_examples/options.py``; the
model, optimiser and DDFP stream are built in ``ddfp_examples/training_state.py``; checkpoints,
progress and logs in ``ddfp_examples/runtime.py``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from itertools import islice, repeat
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddfp_examples import runtime  # noqa: E402
from ddfp_examples.loaders import build_loaders, steps_per_epoch  # noqa: E402
from ddfp_examples.models import DeepLabV3Plus  # noqa: E402
from ddfp_examples.options import parse_args, run_spec  # noqa: E402
from ddfp_examples.training_state import (  # noqa: E402
    DensityStream,
    TrainingState,
    build_model,
    build_training_state,
    set_poly_lr,
    wrap_distributed,
)
from ddfp_examples.transforms import IGNORE_INDEX, cutmix, cutmix_targets  # noqa: E402

from ddfp_lib import UNKNOWN_CLASS, convert_to_dual_bn, perturbed_bn, pseudo_labels  # noqa: E402


class StreamPredictions(NamedTuple):
    """What the forward pass of a semi-supervised iteration returns; ``None``: stream not run."""

    pred_x: Tensor  # (B, K, H, W) labelled images
    pred_u_w: Tensor  # (B, K, H, W) weak view
    pred_s1: Tensor  # (B, K, H, W) strong views
    pred_s2: Tensor
    h_x: Tensor  # (B, C, H/4, W/4) head features, the flow's training data
    h_u_w: Tensor
    confidence_u_w: Tensor  # (B, H, W) the weak view's pseudo-labels (no gradient)
    labels_u_w: Tensor
    pred_fp: Tensor | None  # dropout FP stream
    pred_ddfp: Tensor | None  # DDFP stream
    confident_fraction: Tensor | None  # share of decoder pixels that drive DDFP


class UniMatchDDFP(nn.Module):
    """The forward passes of one iteration, in one module so that DDP sees every parameter use.

    ``forward(img_x)`` is plain segmentation; ``forward(img_x, (u_w, u_s1, u_s2, ignore), ddfp,
    pseudo)`` runs every stream and returns :class:`StreamPredictions`; ``pseudo`` (confidence,
    labels) replaces the weak view's own pseudo-labels (a mean teacher's).
    """

    def __init__(self, model: DeepLabV3Plus, fp: str, aux_bn: bool, threshold: float = 0.95):
        super().__init__()
        self.model = model
        self.dropout_fp = fp in ("dropout", "both")
        self.density_fp = fp in ("ddfp", "both")
        self.aux_bn = aux_bn
        self.threshold = threshold
        if aux_bn:
            convert_to_dual_bn(model.head)

    def perturbed_branch(self) -> contextlib.AbstractContextManager[Any]:
        """Where perturbed features go through the head: its auxiliary BatchNorm with --aux-bn."""
        return perturbed_bn(self.model.head) if self.aux_bn else contextlib.nullcontext()

    def perturbed_decode(self, v: Tensor) -> Tensor:
        """``classifier(head(v))`` through the BatchNorm of perturbed features."""
        with self.perturbed_branch():
            return self.model.decode(v)

    def forward(
        self,
        img_x: Tensor,
        views: tuple[Tensor, ...] | None = None,
        ddfp: DensityStream | None = None,
        pseudo: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | StreamPredictions:
        if views is None:
            return self.model(img_x)
        img_u_w, img_u_s1, img_u_s2, ignore_mask = views
        model, n_x, n_u, size = self.model, img_x.shape[0], img_u_w.shape[0], img_x.shape[-2:]
        low, high = model.encode(torch.cat([img_x, img_u_w]))
        if self.dropout_fp:
            # UniMatch's FP: dropped-out copies of the encoder features decoded in the same pass.
            low = torch.cat([low, F.dropout2d(low, 0.5, training=True)])
            high = torch.cat([high, F.dropout2d(high, 0.5, training=True)])
        v = model.decoder_input(low, high)
        h = model.head(v)
        logits = model.classifier(h)
        clean = model.upsample(logits[: n_x + n_u], size)
        # The weak view's pseudo-labels: its own detached prediction, or a mean teacher's.
        confidence, labels = pseudo_labels(clean[n_x:]) if pseudo is None else pseudo
        pred_fp = model.upsample(logits[2 * n_x + n_u :], size) if self.dropout_fp else None
        pred_ddfp = confident_fraction = None
        if self.density_fp and ddfp is not None:
            v_u_w = v[n_x : n_x + n_u]
            mask = confident_mask(confidence, ignore_mask, self.threshold, v_u_w.shape[-2:])
            # The direction is taken through the BatchNorm that the perturbed branch then uses.
            with self.perturbed_branch(), record_function("ddfp_direction"):
                v_ddfp = ddfp.perturbation(v_u_w, head=ddfp.head, mask=mask)
            with record_function("ddfp_perturbed_branch"):
                pred_ddfp = model.upsample(self.perturbed_decode(v_ddfp), size)
            confident_fraction = mask.float().mean()
        with record_function("strong_views"):
            pred_s1, pred_s2 = model(torch.cat([img_u_s1, img_u_s2])).chunk(2)
        return StreamPredictions(
            clean[:n_x], clean[n_x:], pred_s1, pred_s2, h[:n_x], h[n_x : n_x + n_u],
            confidence, labels, pred_fp, pred_ddfp, confident_fraction,
        )  # fmt: skip


def confident_mask(confidence, ignore_mask, threshold, feature_size) -> Tensor:
    """Pixels with a confident pseudo-label and no padding, at the decoder's feature resolution."""
    confident = (confidence >= threshold) & (ignore_mask != IGNORE_INDEX)
    return F.interpolate(confident[:, None].float(), size=feature_size, mode="nearest")[:, 0].bool()


def segmenter_of(net: nn.Module) -> nn.Module:
    """The segmenter inside the streams module, itself inside DDP in a distributed run."""
    return getattr(net, "module", net).model


def unsupervised_losses(
    net: nn.Module, batch: Any, state: TrainingState, args: Any, device: torch.device, burn_in: bool
) -> tuple[dict[str, Tensor], StreamPredictions, Tensor]:
    """Every stream's loss on one labelled + unlabelled batch, its predictions and padding mask."""
    (img_x, mask_x), u, u_mix = batch
    img_u_w, img_u_s1, img_u_s2, ignore, box1, box2 = (t.to(device, non_blocking=True) for t in u)
    img_mix_w, img_mix_s1, img_mix_s2, ignore_mix = (
        t.to(device, non_blocking=True) for t in u_mix[:4]
    )
    teacher = state.teacher
    # Pseudo-labels of the second unlabelled batch, whose regions CutMix pastes in (and, with a
    # mean teacher, of the weak view too).
    with torch.no_grad(), autocast(state, device), record_function("cutmix_pseudo_labels"):
        if teacher is not None:
            teacher.start(segmenter_of(net))
            conf_mix, labels_mix = pseudo_labels(teacher.model(img_mix_w))
            pseudo = pseudo_labels(teacher.model(img_u_w))
        else:
            net.eval()
            conf_mix, labels_mix = pseudo_labels(net(img_mix_w))
            net.train()
            pseudo = None
    img_u_s1, img_u_s2 = cutmix(img_u_s1, img_mix_s1, box1), cutmix(img_u_s2, img_mix_s2, box2)
    with autocast(state, device):
        views = (img_u_w, img_u_s1, img_u_s2, ignore)
        out = net(img_x, views, None if burn_in else state.ddfp, pseudo)
    weak = (out.labels_u_w, out.confidence_u_w, ignore)
    mixed = (labels_mix, conf_mix, ignore_mix)
    consistency = state.consistency
    losses = {
        "x": F.cross_entropy(out.pred_x.float(), mask_x, ignore_index=IGNORE_INDEX),
        "s1": consistency(out.pred_s1, *cutmix_targets(*weak, *mixed, box1)),
        "s2": consistency(out.pred_s2, *cutmix_targets(*weak, *mixed, box2)),
    }
    for name, pred in (("fp", out.pred_fp), ("ddfp", out.pred_ddfp)):
        if pred is not None:
            losses[name] = consistency(pred, *weak)
    return losses, out, ignore


def autocast(state: TrainingState, device: torch.device) -> torch.autocast:
    dtype = state.amp_dtype
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_step(
    net: nn.Module,
    batches: list[Any],
    state: TrainingState,
    args: Any,
    device: torch.device,
    warmup: bool = False,
    burn_in: bool = False,
) -> dict[str, Tensor]:
    """One UniMatch (+ DDFP) iteration: losses, backward, optimiser step, then the flow's step.

    ``batches``: one batch, or ``--accumulate`` of them whose gradients add up to one step.
    ``warmup``: labelled loss only (the unlabelled batches are drawn but not used).
    ``burn_in``: every stream but DDFP; the flow still takes its step (see --flow-burn-in).
    """
    state.optimizer.zero_grad(set_to_none=True)
    logged: dict[str, Tensor] = {}
    flow_features: list[Tensor] = []
    flow_labels: list[Tensor] = []
    confident: list[Tensor] = []
    for index, batch in enumerate(batches):
        img_x, mask_x = (t.to(device, non_blocking=True) for t in batch[0])
        last = index == len(batches) - 1
        # DDP averages the gradients across processes once, at the last batch of the step.
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            if args.mode == "supervised" or warmup:
                with autocast(state, device):
                    pred_x = net(img_x)
                losses = {"x": F.cross_entropy(pred_x.float(), mask_x, ignore_index=IGNORE_INDEX)}
                total, out = losses["x"], None
            else:
                batch = ((img_x, mask_x), *batch[1:])
                losses, out, ignore = unsupervised_losses(net, batch, state, args, device, burn_in)
                loss_x, loss_s1, loss_s2 = losses["x"], losses["s1"], losses["s2"]
                loss_fp, loss_ddfp = (losses.get(k, loss_x.new_zeros(())) for k in ("fp", "ddfp"))
                normaliser = 2.0 if "fp" in losses or "ddfp" in losses else 1.5
                total = (
                    loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp
                    + args.ddfp_weight * loss_ddfp
                ) / normaliser  # fmt: skip
            with record_function("backward"):
                state.scaler.scale(total / len(batches)).backward()
        for name, value in [*((f"loss_{k}", v) for k, v in losses.items()), ("loss", total)]:
            logged[name] = logged.get(name, 0.0) + value.detach() / len(batches)
        if out is not None:
            flow_features += [out.h_x.detach(), out.h_u_w.detach()]
            flow_labels += [
                mask_x,
                torch.where(ignore == IGNORE_INDEX, IGNORE_INDEX, UNKNOWN_CLASS),
            ]
            if out.confident_fraction is not None:
                confident.append(out.confident_fraction.detach())
    with record_function("optimizer_step"):
        state.scaler.step(state.optimizer)
        state.scaler.update()
    if state.flow_trainer is not None and flow_features:
        with record_function("flow_update"):
            logged["flow_nll"] = state.flow_trainer.step(flow_features, flow_labels)
    if confident:
        logged["confident"] = sum(confident) / len(confident)
    if state.teacher is not None and flow_features:
        state.teacher.update(segmenter_of(net))
    return logged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ctx = runtime.setup_distributed(args.device)
    torch.manual_seed(args.seed + ctx.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    spec, out_dir = run_spec(args), args.out
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(vars(args), default=str, indent=2))

    loaders, val_loader, sizes = build_loaders(args, ctx)
    iters_per_epoch = steps_per_epoch(loaders, args)
    total_iters = iters_per_epoch * args.epochs

    model = build_model(args, spec.num_classes, ctx)
    if runtime.uses_sync_batchnorm(ctx):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Channels-last convolutions run faster on CPUs (oneDNN) and on tensor-core GPUs alike.
    model.to(ctx.device, memory_format=torch.channels_last)
    streams = UniMatchDDFP(model, args.fp, args.aux_bn, args.threshold).to(ctx.device)
    net = wrap_distributed(streams, args, ctx) if ctx.distributed else streams
    state = build_training_state(args, model, spec, total_iters, ctx.device)

    progress = runtime.Progress()
    resume_path = out_dir / "latest.pt" if args.resume == "auto" else args.resume
    if resume_path is not None:
        progress = runtime.restore_run(Path(resume_path), model, state, ctx)
        if ctx.is_main:
            print(f"[ddfp] resumed from {resume_path} at iteration {progress.iteration}")
    log = runtime.CsvLog(out_dir / "log.csv", out_dir / "tensorboard") if ctx.is_main else None
    if ctx.is_main:
        print(
            f"[ddfp] {args.dataset}: {sizes['labeled']} labelled / {sizes['unlabeled']} unlabelled / "
            f"{sizes['val']} val images; {args.backbone}, mode={args.mode}, fp={args.fp}, "
            f"{args.epochs} epochs x {iters_per_epoch} iterations on {ctx.device} x{ctx.world_size}"
        )
    steps = args.accumulate
    images = (2 if args.mode == "semi" else 1) * args.batch_size * ctx.world_size * steps
    # Training + evaluation time of the whole run: a resumed run adds what the checkpoint holds.
    start_time, prior_seconds, ran, stopped = time.time(), progress.seconds, 0, False

    def save(name: str) -> None:
        progress.seconds = prior_seconds + time.time() - start_time
        runtime.save_run(out_dir / name, model, state, progress, args, ctx)

    with runtime.StopRequest() as stop:
        while progress.epoch < args.epochs and not stopped:
            epoch, start = progress.epoch, progress.step_in_epoch
            for loader in loaders.values():
                loader.sampler.set_epoch(epoch, start * args.batch_size * args.accumulate)
            unlabeled = (repeat(None), repeat(None))
            if args.mode == "semi":
                unlabeled = (loaders["u"], loaders["u_mix"])
            batches = islice(zip(loaders["x"], *unlabeled), (iters_per_epoch - start) * steps)
            # Each step takes --accumulate consecutive batches.
            batches = zip(*[iter(batches)] * steps)
            bar = runtime.progress_bar(
                batches, iters_per_epoch, start, f"epoch {epoch + 1}/{args.epochs}",
                enabled=ctx.is_main and not args.no_progress,
            )  # fmt: skip
            for batch in bar:
                lr = set_poly_lr(state.optimizer, args, progress.iteration, total_iters)
                tic = time.time()
                warmup = epoch < args.warmup_epochs
                burn_in = epoch < args.warmup_epochs + args.flow_burn_in
                logged = train_step(net, list(batch), state, args, ctx.device, warmup, burn_in)
                progress.iteration, progress.step_in_epoch, ran = (
                    progress.iteration + 1, progress.step_in_epoch + 1, ran + 1,
                )  # fmt: skip
                if ctx.is_main:
                    speed = images / max(time.time() - tic, 1e-9)
                    runtime.report(logged, bar, log, progress, lr, speed, args.log_every)
                if stop.requested or (args.stop_after is not None and ran >= args.stop_after):
                    stopped = True
                    break
            if stopped:
                break
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            if progress.epoch == args.epochs or progress.epoch % args.eval_every == 0:
                meter, extra = runtime.evaluate_run(
                    model, state.teacher, val_loader, spec, args, ctx
                )
                if runtime.record_evaluation(meter, progress, spec.class_names, ctx.is_main, extra):
                    save("best.pt")
            save("latest.pt")
        if stopped:
            save("latest.pt")
            if ctx.is_main:
                print(
                    f"[ddfp] stopped at iteration {progress.iteration}; saved "
                    f"{out_dir / 'latest.pt'} (continue with --resume)"
                )

    progress.seconds = prior_seconds + time.time() - start_time
    summary = runtime.finish_run(progress, args, spec.class_names, stopped, log, ctx)
    return summary


if __name__ == "__main__":
    main()
