"""DeepLabV3+ with the decoder split where DDFP perturbs it, and the builder the example loop calls.

The decoder is exposed in the pieces DDFP needs: ``decoder_input`` builds the 304-channel tensor
``v`` (48 reduced low-level channels + 256 upsampled ASPP channels at stride 4), ``head`` is the
fuse block whose 256-channel output ``h`` is the density space, and ``classifier`` is the final
1x1 conv. A perturbed branch is ``classifier(head(v + delta))``. The model satisfies
:class:`ddfp_lib.adapters.Segmenter`, as the smp adapter does.

References:
    Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
    Segmentation", ECCV 2018. Wang et al., "Towards the Uncharted: Density-Descending Feature
    Perturbation for Semi-supervised Semantic Segmentation", CVPR 2024.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddfp_lib.adapters import SplitSegmenter

from .backbones import (
    BackboneWeightsError,
    MobileNetV2Backbone,
    PathLike,
    ResNetBackbone,
    check_image_batch,
    load_backbone_weights,
    read_backbone_checkpoint,
)

__all__ = ["ASPP", "DeepLabV3Plus", "build_deeplabv3plus", "fuse_block"]

BACKBONE_NAMES = ("resnet50", "resnet101", "mobilenet_v2")


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def fuse_block(in_channels: int = 304, channels: int = 256, dropout: float = 0.1) -> nn.Sequential:
    """DeepLabV3+'s decoder fuse block, DDFP's ``head``: (conv3x3-BN-ReLU-Dropout2d) x 2.

    Shape:
        - input ``(B, in_channels, H, W)`` -> output ``(B, channels, H, W)``
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, dilated 3x3 branches and an image-pool branch.

    ``project(concat[b_0(x), b_r1(x), ..., pool(x)])``, each branch and ``project`` being
    conv-BN-ReLU, as in UniMatch's DeepLabV3+ (no dropout after the projection).

    Args:
        in_channels: channels of the high-level features.
        out_channels: channels of each branch and of the output.
        dilations: dilation of each 3x3 branch.

    Shape:
        x: (B, in_channels, h, w).
        output: (B, out_channels, h, w).
    """

    def __init__(
        self, in_channels: int, out_channels: int = 256, dilations: Sequence[int] = (6, 12, 18)
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, dilation=d) for d in dilations]
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, out_channels, 1)
        )
        self.project = _conv_bn_relu((len(dilations) + 2) * out_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ASPP expects (B, {self.in_channels}, h, w), got {tuple(x.shape)}")
        pooled = self.image_pool(x)
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(SplitSegmenter):
    """DeepLabV3+ whose decoder is split at the features DDFP perturbs.

    ``logits = up(classifier(head(v)))`` with
    ``v = concat[reduce(low), up(aspp(high))]`` and ``(low, high) = backbone(x)``; every ``up`` is
    bilinear with ``align_corners=True``. ``head`` is conv3x3-BN-ReLU-Dropout2d twice, the fuse
    block of DDFP's reference decoder (UniMatch's is the same without dropout: ``head_dropout=0``).

    Args:
        backbone: module mapping (B, 3, H, W) to ``(low, high)``.
        num_classes: K, the number of classes.
        low_channels: channels of ``low`` (256 for ResNet, 24 for MobileNetV2).
        high_channels: channels of ``high`` (2048 for ResNet, 320 for MobileNetV2).
        aspp_dilations: dilations of the ASPP 3x3 branches.
        low_reduced: channels ``low`` is reduced to before the concat.
        head_channels: channels of the ASPP output and of ``h``.
        head_dropout: Dropout2d probability after each conv of ``head``.

    Shape:
        x: (B, 3, H, W) float.
        low: (B, low_channels, H/4, W/4); high: (B, high_channels, H/s, W/s), s the output stride.
        v: (B, low_reduced + head_channels, H/4, W/4), 304 channels by default.
        h: (B, head_channels, H/4, W/4).
        logits: (B, K, H, W) from ``forward``; (B, K, H/4, W/4) from ``decode``.
        (H/n stands for the backbone's ceil(H/n).)

    Example:
        >>> from ddfp_examples.backbones import mobilenet_v2_backbone
        >>> model = DeepLabV3Plus(mobilenet_v2_backbone(), 21, low_channels=24, high_channels=320)
        >>> _ = model.eval()
        >>> out = model.forward_features(torch.zeros(1, 3, 33, 33))
        >>> tuple(out.logits.shape), tuple(out.v.shape), tuple(out.h.shape)
        ((1, 21, 33, 33), (1, 304, 9, 9), (1, 256, 9, 9))
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        low_channels: int,
        high_channels: int,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        low_reduced: int = 48,
        head_channels: int = 256,
        head_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.low_channels = low_channels
        self.high_channels = high_channels
        self.decoder_channels = low_reduced + head_channels

        self.backbone = backbone
        self.aspp = ASPP(high_channels, head_channels, aspp_dilations)
        self.reduce = _conv_bn_relu(low_channels, low_reduced, 1)
        self.head = fuse_block(self.decoder_channels, head_channels, head_dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features ``(low, high)`` of an image batch x."""
        check_image_batch(x)
        return self.backbone(x)

    def decoder_input(self, low: Tensor, high: Tensor) -> Tensor:
        """Build ``v = concat[reduce(low), up(aspp(high))]`` at low's resolution."""
        if low.dim() != 4 or low.shape[1] != self.low_channels:
            raise ValueError(f"low must be (B, {self.low_channels}, h, w), got {tuple(low.shape)}")
        if high.dim() != 4 or high.shape[1] != self.high_channels:
            raise ValueError(
                f"high must be (B, {self.high_channels}, h, w), got {tuple(high.shape)}"
            )
        if low.shape[0] != high.shape[0]:
            raise ValueError(f"low and high batch sizes differ: {low.shape[0]} vs {high.shape[0]}")
        context = F.interpolate(
            self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=True
        )
        return torch.cat([self.reduce(low), context], dim=1)

    def _check_decoder_input(self, v: Tensor) -> None:
        if v.dim() != 4 or v.shape[1] != self.decoder_channels:
            raise ValueError(f"v must be (B, {self.decoder_channels}, h, w), got {tuple(v.shape)}")

    def decode(self, v: Tensor) -> Tensor:
        """Logits ``classifier(head(v))`` at v's resolution."""
        self._check_decoder_input(v)
        return self.classifier(self.head(v))

    def upsample(self, logits: Tensor, size: Sequence[int]) -> Tensor:
        """Bilinearly resize (B, K, h, w) logits to ``size = (H, W)`` with ``align_corners=True``."""
        if logits.dim() != 4:
            raise ValueError(f"logits must be (B, K, h, w), got {tuple(logits.shape)}")
        if len(size) != 2:
            raise ValueError(f"size must be (H, W), got {tuple(size)}")
        return F.interpolate(
            logits, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=True
        )

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the pretrained encoder (base learning rate)."""
        return self.backbone.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the backbone: ASPP, reduction, head, classifier (10x learning rate)."""
        in_backbone = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in in_backbone)


def _checkpoint_has_deep_stem(state_dict: dict[str, Tensor]) -> bool:
    return "conv1.0.weight" in state_dict


def build_deeplabv3plus(
    backbone: str = "resnet101",
    num_classes: int = 21,
    backbone_weights: PathLike | None = None,
    deep_stem: bool | None = None,
    output_stride: int | None = None,
    aspp_dilations: Sequence[int] | None = None,
    head_channels: int = 256,
    low_reduced: int = 48,
    head_dropout: float = 0.1,
) -> DeepLabV3Plus:
    """Build DeepLabV3+ on a named backbone, loading local ImageNet weights when given.

    Args:
        backbone: "resnet101", "resnet50" or "mobilenet_v2".
        num_classes: K.
        backbone_weights: local checkpoint for the encoder (see
            :func:`~ddfp_examples.backbones.load_backbone_weights`); None leaves it random and warns.
        deep_stem: ResNet stem layout. None infers it from the checkpoint (``conv1.0.weight``
            present), and picks the deep stem of UniMatch's / DDFP's checkpoints without one.
            Must be None or False for MobileNetV2.
        output_stride: defaults to 16 for ResNet and 8 for MobileNetV2.
        aspp_dilations: defaults to (6, 12, 18) scaled by 16 / output_stride, so (12, 24, 36) at 8
            (the rates follow the size of the feature map).
        head_channels: width of the ASPP output and of the fuse block (256 in DeepLabV3+).
        low_reduced: channels the low-level features are reduced to (48 in DeepLabV3+).
        head_dropout: Dropout2d probability after each conv of the fuse block ``head``: 0.1 as in
            the DDFP reference decoder; UniMatch's decoder has none (0).

    Returns:
        The model, in training mode.

    Raises:
        ValueError: unknown backbone name or inconsistent options.
        BackboneWeightsError: the checkpoint does not fit the backbone.
    """
    if backbone not in BACKBONE_NAMES:
        raise ValueError(f"backbone must be one of {BACKBONE_NAMES}, got {backbone!r}")
    if not 0.0 <= head_dropout < 1.0:
        raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}")
    checkpoint = None if backbone_weights is None else read_backbone_checkpoint(backbone_weights)

    encoder: ResNetBackbone | MobileNetV2Backbone
    if backbone == "mobilenet_v2":
        if deep_stem:
            raise ValueError("deep_stem applies to ResNet backbones only")
        encoder = MobileNetV2Backbone(output_stride=output_stride or 8)
    else:
        if deep_stem is None:
            deep_stem = True if checkpoint is None else _checkpoint_has_deep_stem(checkpoint)
        encoder = ResNetBackbone(
            depth=int(backbone.removeprefix("resnet")),
            deep_stem=deep_stem,
            output_stride=output_stride or 16,
        )

    if checkpoint is None:
        warnings.warn(
            f"{backbone} backbone is randomly initialised (no backbone_weights): segmentation results will be poor.",
            stacklevel=2,
        )
    else:
        try:
            load_backbone_weights(encoder, checkpoint, strict=True)
        except BackboneWeightsError as error:
            raise BackboneWeightsError(f"{backbone_weights}: {error}") from error

    if aspp_dilations is None:
        aspp_dilations = tuple(d * 16 // encoder.output_stride for d in (6, 12, 18))
    return DeepLabV3Plus(
        encoder,
        num_classes,
        low_channels=encoder.low_channels,
        high_channels=encoder.high_channels,
        aspp_dilations=aspp_dilations,
        low_reduced=low_reduced,
        head_channels=head_channels,
        head_dropout=head_dropout,
    )
