"""segmentation_models_pytorch's DeepLabV3+, FPN and UPerNet with their decoders split where DDFP
perturbs them.

Every smp model classifies with ``segmentation_head = (conv1x1, Upsample(4), activation)``. The
adapters expose the decoder in the pieces of :class:`~ddfp_lib.adapters.Segmenter`: ``v =
decoder_input(*encode(x))`` is the input of the last block before the 1x1 conv, ``head`` is that
block (its output ``h`` is the density space) and ``classifier`` is the 1x1 conv, so a perturbed
branch is ``classifier(head(v + delta))``:

- DeepLabV3+: ``v = concat[up(aspp(high)), block1(low)]``, ``head = decoder.block2``.
- UPerNet: ``v`` = the PSP and FPN levels resized to stride 4 and concatenated, ``head =
  decoder.fusion_block`` (conv3x3-BN-ReLU).
- FPN: ``v`` = the merged pyramid, ``head = decoder.dropout``: FPN has no learned layer between its
  merge and the classifier, so ``v`` and ``h`` share one space.

Any smp encoder works, timm's included (``"tu-resnet18"`` and other ``tu-`` names).
segmentation_models_pytorch is imported only when an adapter is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .segmenter import SplitSegmenter

__all__ = ["SMPFPN", "SMPDeepLabV3Plus", "SMPUPerNet", "build_smp_deeplabv3plus"]


def _import_smp() -> Any:
    try:
        import segmentation_models_pytorch
    except ImportError as error:
        raise ImportError(
            "the smp adapters need segmentation_models_pytorch: pip install segmentation-models-pytorch"
        ) from error
    return segmentation_models_pytorch


class _SMPSegmenter(SplitSegmenter):
    """The parts every smp adapter shares: the checks of the wrapped model, the encoder call, the
    1x1 classifier, the upsampling and the passes built from them.

    A subclass names the smp class it wraps (``architecture``) and the decoder attributes it reads
    (``decoder_parts``), and defines ``head``, ``encode``, ``decoder_input`` and ``_v_channels``.
    """

    architecture = ""
    decoder_parts: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        super().__init__()
        smp = _import_smp()
        if not isinstance(model, getattr(smp, self.architecture)):
            raise ValueError(
                f"model must be a segmentation_models_pytorch.{self.architecture}, got "
                f"{type(model).__name__}"
            )
        decoder = model.decoder
        if not all(hasattr(decoder, name) for name in self.decoder_parts):
            raise ValueError(
                f"the {self.architecture} decoder lacks {'/'.join(self.decoder_parts)}; the adapter "
                "follows the decoder layout of segmentation_models_pytorch 0.6"
            )
        activation = getattr(model.segmentation_head[-1], "activation", None)
        if not isinstance(activation, nn.Identity):
            raise ValueError(
                f"the model applies the output activation {type(activation).__name__}; build it with "
                "activation=None so that the adapter returns logits"
            )
        self.model = model
        self.num_classes = int(self.classifier.out_channels)
        self.decoder_channels = self._v_channels()

    def _v_channels(self) -> int:
        """The number of channels of ``v``."""
        raise NotImplementedError

    @property
    def head(self) -> nn.Module:
        """The block between ``v`` and the classifier: ``v`` -> ``h``."""
        raise NotImplementedError

    @property
    def classifier(self) -> nn.Conv2d:
        """The 1x1 conv of smp's segmentation head: ``h`` -> logits at ``h``'s resolution."""
        return self.model.segmentation_head[0]

    def _encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every feature map of smp's encoder, strides 1, 2, 4, ... up to the output stride."""
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W), got {tuple(x.shape)}")
        self.model.check_input_shape(x)
        return self.model.encoder(x)

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


class SMPDeepLabV3Plus(_SMPSegmenter):
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

    architecture = "DeepLabV3Plus"
    decoder_parts = ("aspp", "up", "block1", "block2")

    def _v_channels(self) -> int:
        return int(self.model.decoder.block2[0][0].in_channels)

    @property
    def head(self) -> nn.Module:
        """The fuse block ``decoder.block2`` (separable conv-BN-ReLU): ``v`` -> ``h``."""
        return self.model.decoder.block2

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encoder features ``(low, high)`` (stride 4 and the deepest stage) of an image batch."""
        features = self._encoder_features(x)
        return features[2], features[-1]

    def decoder_input(self, *features: torch.Tensor) -> torch.Tensor:
        """``v = concat[up(aspp(high)), block1(low)]`` from ``(low, high)``, the perturbation point."""
        if len(features) != 2:
            raise ValueError(f"DeepLabV3+ decodes (low, high), got {len(features)} feature maps")
        low, high = features
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


class SMPUPerNet(_SMPSegmenter):
    """Wrap a ``segmentation_models_pytorch.UPerNet``; its fusion block is the head.

    smp's UPerNet normalises the encoder stages at strides 4 to 32, runs a pyramid pooling module
    on the deepest and an FPN top-down path with a 3x3 conv per level, resizes the ``L`` levels to
    stride 4 and concatenates them (deepest first): that is ``v``. ``head = decoder.fusion_block``
    (conv3x3-BN-ReLU) gives ``h``, the density space, and ``classifier`` is the 1x1 conv of the
    segmentation head. ``forward(x)`` equals ``model(x)``.

    Args:
        model: an smp UPerNet with no output activation (logits are needed).

    Shape:
        - x: ``(B, 3, H, W)``, H and W divisible by the encoder's output stride (32)
        - encode: the ``L`` stages ``(B, C_i, H/s_i, W/s_i)``, s_i = 4, 8, 16, 32 for depth 5
        - v: ``(B, L * D, H/4, W/4)``; h: ``(B, D, H/4, W/4)``, D = decoder_channels (256)
        - logits: ``(B, K, H, W)`` from ``forward``; ``(B, K, H/4, W/4)`` from ``decode``

    References:
        Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018.
        Iakubovskii, "Segmentation Models Pytorch", GitHub, 2019.

    Examples:
        >>> import segmentation_models_pytorch as smp
        >>> net = smp.UPerNet("tu-resnet18", encoder_weights=None, classes=3, decoder_channels=32)
        >>> model = SMPUPerNet(net).eval()
        >>> out = model.forward_features(torch.zeros(1, 3, 64, 64))
        >>> tuple(out.logits.shape), tuple(out.v.shape), tuple(out.h.shape)
        ((1, 3, 64, 64), (1, 128, 16, 16), (1, 32, 16, 16))
    """

    architecture = "UPerNet"
    decoder_parts = (
        "feature_norms",
        "psp",
        "fpn_lateral_blocks",
        "fpn_conv_blocks",
        "fusion_block",
    )

    def _v_channels(self) -> int:
        return int(self.model.decoder.fusion_block[0].in_channels)

    @property
    def head(self) -> nn.Module:
        """The fusion block ``decoder.fusion_block`` (conv3x3-BN-ReLU): ``v`` -> ``h``."""
        return self.model.decoder.fusion_block

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The encoder stages UPerNet reads, stride 4 first."""
        return tuple(self._encoder_features(x)[2:])

    def decoder_input(self, *features: torch.Tensor) -> torch.Tensor:
        """``v``: the PSP output and the FPN levels, resized to stride 4 and concatenated."""
        decoder = self.model.decoder
        if len(features) != len(decoder.feature_norms):
            raise ValueError(
                f"UPerNet decodes {len(decoder.feature_norms)} stages, got {len(features)}"
            )
        stages = [norm(feature) for norm, feature in zip(decoder.feature_norms, features)]
        levels = [decoder.psp(stages[-1])]
        for lateral_block, lateral in zip(decoder.fpn_lateral_blocks, stages[-2::-1]):
            levels.append(lateral_block(levels[-1], lateral))
        levels[1:] = [conv(level) for conv, level in zip(decoder.fpn_conv_blocks, levels[1:])]
        size = levels[-1].shape[-2:]
        resized = [
            F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            for level in levels
        ]
        return torch.cat(resized[::-1], dim=1)


class SMPFPN(_SMPSegmenter):
    """Wrap a ``segmentation_models_pytorch.FPN``; the merged pyramid is both ``v`` and ``h``.

    smp's FPN builds a top-down pyramid at strides 32 to 4, turns each level into a stride-4 map
    (conv3x3-GroupNorm-ReLU and x2 upsampling per octave), merges the four maps (sum, or concat
    with ``decoder_merge_policy="cat"``) and applies ``Dropout2d`` before the 1x1 classifier. No
    learned layer follows the merge, so ``v`` is the merged map, ``head`` is the decoder's
    ``Dropout2d`` (the identity in eval mode) and ``h`` lives in the space of ``v``: DDFP then
    measures the density on the perturbed features themselves. The adapter makes that dropout
    out-of-place (the values are the same) so that ``head(v)`` leaves ``v`` intact.
    ``forward(x)`` equals ``model(x)``.

    Args:
        model: an smp FPN with no output activation (logits are needed).

    Shape:
        - x: ``(B, 3, H, W)``, H and W divisible by the encoder's output stride (32)
        - encode: the four stages ``(B, C_i, H/s_i, W/s_i)``, s_i = 4, 8, 16, 32
        - v, h: ``(B, S, H/4, W/4)``, S = decoder_segmentation_channels (128), 4 S with "cat"
        - logits: ``(B, K, H, W)`` from ``forward``; ``(B, K, H/4, W/4)`` from ``decode``

    References:
        Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017. Kirillov et al.,
        "Panoptic Feature Pyramid Networks", CVPR 2019.
        Iakubovskii, "Segmentation Models Pytorch", GitHub, 2019.

    Examples:
        >>> import segmentation_models_pytorch as smp
        >>> net = smp.FPN("tu-resnet18", encoder_weights=None, classes=3,
        ...               decoder_pyramid_channels=32, decoder_segmentation_channels=32)
        >>> model = SMPFPN(net).eval()
        >>> out = model.forward_features(torch.zeros(1, 3, 64, 64))
        >>> tuple(out.logits.shape), tuple(out.v.shape), tuple(out.h.shape)
        ((1, 3, 64, 64), (1, 32, 16, 16), (1, 32, 16, 16))
    """

    architecture = "FPN"
    decoder_parts = ("p5", "p4", "p3", "p2", "seg_blocks", "merge", "dropout")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        # In place, the dropout of h = head(v) would overwrite v, which the loop still needs.
        self.model.decoder.dropout.inplace = False

    def _v_channels(self) -> int:
        return int(self.classifier.in_channels)

    @property
    def head(self) -> nn.Module:
        """The decoder's ``Dropout2d`` after the merge: ``v`` -> ``h``, same width."""
        return self.model.decoder.dropout

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four encoder stages FPN reads, stride 4 first."""
        return tuple(self._encoder_features(x)[-4:])

    def decoder_input(self, *features: torch.Tensor) -> torch.Tensor:
        """``v``: the four pyramid levels turned into stride-4 maps and merged."""
        if len(features) != 4:
            raise ValueError(f"FPN decodes 4 stages, got {len(features)}")
        c2, c3, c4, c5 = features
        decoder = self.model.decoder
        p5 = decoder.p5(c5)
        p4 = decoder.p4(p5, c4)
        p3 = decoder.p3(p4, c3)
        p2 = decoder.p2(p3, c2)
        maps = [block(level) for block, level in zip(decoder.seg_blocks, (p5, p4, p3, p2))]
        return decoder.merge(maps)


def build_smp_deeplabv3plus(
    encoder_name: str = "resnet34",
    num_classes: int = 21,
    encoder_weights: str | None = "imagenet",
    **kwargs: Any,
) -> SMPDeepLabV3Plus:
    """Build ``smp.DeepLabV3Plus(encoder_name, classes=num_classes, ...)`` and wrap it.

    Args:
        encoder_name: any smp encoder name (``"tu-..."`` for a timm model).
        num_classes: K.
        encoder_weights: smp's pretrained-weights name ("imagenet" downloads them), or None.
        **kwargs: further arguments of ``smp.DeepLabV3Plus`` (e.g. ``encoder_output_stride``).
    """
    smp = _import_smp()
    model = smp.DeepLabV3Plus(
        encoder_name=encoder_name, encoder_weights=encoder_weights, classes=num_classes, **kwargs
    )
    return SMPDeepLabV3Plus(model)
