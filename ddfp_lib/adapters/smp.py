"""segmentation_models_pytorch's DeepLabV3+ with its decoder split where DDFP perturbs it.

smp 0.6 builds the decoder as ``block2(concat[up(aspp(high)), block1(low)])`` and classifies with
``segmentation_head = (conv1x1, Upsample(4), activation)``. The adapter exposes the same pieces as the
example DeepLabV3+: ``v = decoder_input(low, high)`` is the 304-channel concat (256 ASPP + 48 low-level
channels), ``head`` is ``decoder.block2`` (its output ``h`` is the density space) and ``classifier`` is
the 1x1 conv, so a perturbed branch is ``classifier(head(v + delta))``.

segmentation_models_pytorch is imported only when an adapter is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SMPDeepLabV3Plus", "SegmenterOutput", "build_smp_deeplabv3plus"]


class SegmenterOutput(NamedTuple):
    """One forward pass with the tensors a perturbed branch needs.

    Attributes:
        logits: class scores at input resolution, ``(B, K, H, W)``.
        v: decoder input (the perturbation point), ``(B, 304, H/4, W/4)`` by default.
        h: head output (the density space), ``(B, 256, H/4, W/4)`` by default.

    Examples:
        >>> v, h = torch.zeros(1, 304, 8, 8), torch.zeros(1, 256, 8, 8)
        >>> out = SegmenterOutput(logits=torch.zeros(1, 3, 32, 32), v=v, h=h)
        >>> tuple(out.h.shape)
        (1, 256, 8, 8)
    """

    logits: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor


def _import_smp() -> Any:
    try:
        import segmentation_models_pytorch
    except ImportError as error:
        raise ImportError(
            "the smp adapter needs segmentation_models_pytorch: pip install segmentation-models-pytorch"
        ) from error
    return segmentation_models_pytorch


class SMPDeepLabV3Plus(nn.Module):
    """Wrap a ``segmentation_models_pytorch.DeepLabV3Plus`` so the loop can perturb its decoder input.

    ``logits = upsample(classifier(head(v)))`` with ``v = concat[up(aspp(high)), block1(low)]``,
    exactly smp's own forward (``forward(x)`` equals ``model(x)``). The wrapped model is a submodule,
    so ``parameters()`` and ``state_dict()`` are the model's (under the prefix ``model.``). The
    auxiliary classification head of smp (``aux_params``) is not used.

    Args:
        model: an smp DeepLabV3+ with no output activation (logits are needed).

    Shape:
        - x: ``(B, 3, H, W)``, H and W divisible by the encoder's output stride
        - low: ``(B, C_low, H/4, W/4)``; high: ``(B, C_high, H/s, W/s)``
        - v: ``(B, 304, H/4, W/4)``; h: ``(B, 256, H/4, W/4)`` (default decoder_channels=256)
        - logits: ``(B, K, H, W)`` from ``forward``; ``(B, K, H/4, W/4)`` from ``decode``

    References:
        Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
        Segmentation", ECCV 2018. Iakubovskii, "Segmentation Models Pytorch", GitHub, 2019.

    Examples:
        >>> import segmentation_models_pytorch as smp
        >>> net = smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=3)
        >>> model = SMPDeepLabV3Plus(net).eval()
        >>> out = model.forward_features(torch.zeros(1, 3, 32, 32))
        >>> tuple(out.logits.shape), tuple(out.v.shape), tuple(out.h.shape)
        ((1, 3, 32, 32), (1, 304, 8, 8), (1, 256, 8, 8))
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        smp = _import_smp()
        if not isinstance(model, smp.DeepLabV3Plus):
            raise ValueError(
                f"model must be a segmentation_models_pytorch.DeepLabV3Plus, got {type(model).__name__}"
            )
        decoder = model.decoder
        if not all(hasattr(decoder, name) for name in ("aspp", "up", "block1", "block2")):
            raise ValueError(
                "the DeepLabV3Plus decoder lacks aspp/up/block1/block2; the adapter follows the "
                "decoder layout of segmentation_models_pytorch 0.6"
            )
        activation = getattr(model.segmentation_head[-1], "activation", None)
        if not isinstance(activation, nn.Identity):
            raise ValueError(
                f"the model applies the output activation {type(activation).__name__}; build it with "
                "activation=None so that the adapter returns logits"
            )
        self.model = model
        self.num_classes = int(self.classifier.out_channels)
        self.decoder_channels = int(decoder.block2[0][0].in_channels)

    @property
    def head(self) -> nn.Module:
        """The fuse block ``decoder.block2`` (separable conv-BN-ReLU): ``v`` -> ``h``."""
        return self.model.decoder.block2

    @property
    def classifier(self) -> nn.Conv2d:
        """The 1x1 conv of smp's segmentation head: ``h`` -> logits at ``h``'s resolution."""
        return self.model.segmentation_head[0]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features ``(low, high)`` (stride 4 and the deepest stage) of an image batch."""
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W), got {tuple(x.shape)}")
        self.model.check_input_shape(x)
        features = self.model.encoder(x)
        return features[2], features[-1]

    def decoder_input(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``v = concat[up(aspp(high)), block1(low)]``, the perturbation point."""
        decoder = self.model.decoder
        context = decoder.up(decoder.aspp(high))
        reduced = decoder.block1(low)
        if context.shape[-2:] != reduced.shape[-2:]:
            raise ValueError(
                f"upsampled ASPP output {tuple(context.shape)} and reduced low-level features "
                f"{tuple(reduced.shape)} differ in size; low must be at stride 4 and high at the "
                "encoder's output stride"
            )
        return torch.cat([context, reduced], dim=1)

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        """Logits ``classifier(head(v))`` at ``v``'s resolution."""
        if v.dim() != 4 or v.shape[1] != self.decoder_channels:
            raise ValueError(f"v must be (B, {self.decoder_channels}, h, w), got {tuple(v.shape)}")
        return self.classifier(self.head(v))

    def upsample(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear resize of ``(B, K, h, w)`` logits to ``size = (H, W)``, ``align_corners=True``
        as smp's segmentation head."""
        if logits.dim() != 4 or len(size) != 2:
            raise ValueError(
                f"logits must be (B, K, h, w) and size (H, W), got {tuple(logits.shape)}, {size}"
            )
        return F.interpolate(
            logits, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=True
        )

    def forward_features(self, x: torch.Tensor) -> SegmenterOutput:
        """Full-resolution logits with the decoder input ``v`` and the head output ``h``."""
        v = self.decoder_input(*self.encode(x))
        h = self.head(v)
        logits = self.upsample(self.classifier(h), x.shape[-2:])
        return SegmenterOutput(logits=logits, v=v, h=h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` at the input resolution."""
        return self.forward_features(x).logits


def build_smp_deeplabv3plus(
    encoder_name: str = "resnet34",
    num_classes: int = 21,
    encoder_weights: str | None = "imagenet",
    **kwargs: Any,
) -> SMPDeepLabV3Plus:
    """Build ``smp.DeepLabV3Plus(encoder_name, classes=num_classes, ...)`` and wrap it.

    Args:
        encoder_name: any smp encoder name.
        num_classes: K.
        encoder_weights: smp's pretrained-weights name ("imagenet" downloads them), or None.
        **kwargs: further arguments of ``smp.DeepLabV3Plus`` (e.g. ``encoder_output_stride``).
    """
    smp = _import_smp()
    model = smp.DeepLabV3Plus(
        encoder_name=encoder_name, encoder_weights=encoder_weights, classes=num_classes, **kwargs
    )
    return SMPDeepLabV3Plus(model)
