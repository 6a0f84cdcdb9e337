"""Hugging Face transformers' SegFormer with its all-MLP decode head split where DDFP perturbs it.

``SegformerDecodeHead`` projects every encoder stage to ``decoder_hidden_size`` channels with a
linear layer, resizes the stages to the finest one (stride 4), concatenates them (deepest first),
fuses them with ``linear_fuse`` (1x1 conv) - ``batch_norm`` - ``activation`` - ``dropout`` and
classifies with ``classifier`` (1x1 conv). The adapter cuts it before the fuse:

    v = concat[up(proj_i(stage_i))],    h = dropout(activation(batch_norm(linear_fuse(v)))),
    logits = classifier(h)

so ``v`` has ``num_encoder_blocks * decoder_hidden_size`` channels and ``h``, the density space,
``decoder_hidden_size``. transformers is imported only when an adapter is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .segmenter import SplitSegmenter

__all__ = ["HFSegformer"]

_DECODE_HEAD_PARTS = (
    "linear_projections",
    "linear_fuse",
    "batch_norm",
    "activation",
    "dropout",
    "classifier",
)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "the SegFormer adapter needs Hugging Face transformers: pip install transformers"
        ) from error
    return transformers


class SegformerFuse(nn.Module):
    """The fuse block of a ``SegformerDecodeHead``: ``linear_fuse`` - ``batch_norm`` -
    ``activation`` - ``dropout``, ``v`` -> ``h``.

    It holds the decode head itself (not copies of its layers), so the model's own forward and this
    block run the same modules, and :func:`~ddfp_lib.convert_to_dual_bn` on it converts the decode
    head's BatchNorm for both. Its parameters are the decode head's; only the four fuse layers
    run here.

    Args:
        decode_head: a transformers ``SegformerDecodeHead``.

    Shape:
        - v: ``(B, L * D, H/4, W/4)``; output ``h``: ``(B, D, H/4, W/4)``, D = decoder_hidden_size

    References:
        Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
        Transformers", NeurIPS 2021.

    Examples:
        >>> from transformers import SegformerConfig, SegformerForSemanticSegmentation
        >>> config = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
        ...                          num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16)
        >>> fuse = SegformerFuse(SegformerForSemanticSegmentation(config).decode_head).eval()
        >>> tuple(fuse(torch.zeros(1, 64, 4, 4)).shape)
        (1, 16, 4, 4)
    """

    def __init__(self, decode_head: nn.Module):
        super().__init__()
        self.decode_head = decode_head

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        head: Any = self.decode_head
        return head.dropout(head.activation(head.batch_norm(head.linear_fuse(v))))


class HFSegformer(SplitSegmenter):
    """Wrap a transformers ``SegformerForSemanticSegmentation`` so the loop can perturb its decode
    head's fused features.

    ``v`` is the concatenation of the projected, stride-4 stage features (the input of
    ``linear_fuse``), ``head`` is :class:`SegformerFuse` (``linear_fuse`` - BN - activation -
    dropout), ``h`` its output and ``classifier`` the decode head's 1x1 conv. ``decode(v)`` equals
    the model's ``logits`` (stride 4); ``forward(x)`` resizes them to the input bilinearly with
    ``align_corners=False``, as transformers does for its loss. The wrapped model is the only
    submodule, so ``parameters()`` and ``state_dict()`` are the model's (under ``model.``).

    Args:
        model: a ``SegformerForSemanticSegmentation`` whose config keeps
            ``reshape_last_stage=True`` (the default).

    Shape:
        - x: ``(B, 3, H, W)``, H and W divisible by 32 (the product of the config's ``strides``)
        - encode: the ``L`` stages ``(B, hidden_sizes[i], H/s_i, W/s_i)``, s_i = 4, 8, 16, 32
        - v: ``(B, L * D, H/4, W/4)``; h: ``(B, D, H/4, W/4)``, D = decoder_hidden_size
        - logits: ``(B, K, H, W)`` from ``forward``; ``(B, K, H/4, W/4)`` from ``decode``

    References:
        Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
        Transformers", NeurIPS 2021. Wolf et al., "Transformers: State-of-the-Art Natural
        Language Processing", EMNLP 2020 (System Demonstrations).

    Examples:
        >>> from transformers import SegformerConfig, SegformerForSemanticSegmentation
        >>> config = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
        ...                          num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16,
        ...                          num_labels=3)
        >>> model = HFSegformer(SegformerForSemanticSegmentation(config)).eval()
        >>> out = model.forward_features(torch.zeros(1, 3, 64, 64))
        >>> tuple(out.logits.shape), tuple(out.v.shape), tuple(out.h.shape)
        ((1, 3, 64, 64), (1, 64, 16, 16), (1, 16, 16, 16))
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        transformers = _import_transformers()
        if not isinstance(model, transformers.SegformerForSemanticSegmentation):
            raise ValueError(
                "model must be a transformers.SegformerForSemanticSegmentation, got "
                f"{type(model).__name__}"
            )
        if not all(hasattr(model.decode_head, name) for name in _DECODE_HEAD_PARTS):
            raise ValueError(
                f"the decode head lacks {'/'.join(_DECODE_HEAD_PARTS)}; the adapter follows the "
                "SegformerDecodeHead layout of transformers 4 and 5"
            )
        if not model.config.reshape_last_stage:
            raise ValueError("the adapter needs reshape_last_stage=True in the SegformerConfig")
        self.model = model
        # Kept out of the module tree: its only child is the decode head, already under ``model``.
        self.__dict__["_fuse"] = SegformerFuse(model.decode_head)
        self.num_classes = int(self.classifier.out_channels)
        self.decoder_channels = int(model.decode_head.linear_fuse.in_channels)

    @property
    def head(self) -> SegformerFuse:
        """The fuse block (``linear_fuse`` - BN - activation - dropout): ``v`` -> ``h``."""
        return self.__dict__["_fuse"]

    @property
    def classifier(self) -> nn.Conv2d:
        """The decode head's 1x1 conv: ``h`` -> logits at ``h``'s resolution."""
        return self.model.decode_head.classifier

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The hidden states of the encoder's stages, stride 4 first."""
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W), got {tuple(x.shape)}")
        return tuple(self.model.segformer(x, output_hidden_states=True).hidden_states)

    def decoder_input(self, *features: torch.Tensor) -> torch.Tensor:
        """``v``: every stage projected to ``decoder_hidden_size``, resized to the first stage's
        resolution and concatenated, deepest stage first."""
        projections = self.model.decode_head.linear_projections
        if len(features) != len(projections):
            raise ValueError(f"SegFormer decodes {len(projections)} stages, got {len(features)}")
        size = features[0].shape[-2:]
        stages = []
        for feature, projection in zip(features, projections):
            batch, _, height, width = feature.shape
            projected = projection(feature).transpose(1, 2).reshape(batch, -1, height, width)
            stages.append(F.interpolate(projected, size=size, mode="bilinear", align_corners=False))
        return torch.cat(stages[::-1], dim=1)

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        """Logits ``classifier(head(v))`` at ``v``'s resolution (the model's own ``logits``)."""
        if v.dim() != 4 or v.shape[1] != self.decoder_channels:
            raise ValueError(f"v must be (B, {self.decoder_channels}, h, w), got {tuple(v.shape)}")
        return self.classifier(self.head(v))

    def upsample(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear resize of ``(B, K, h, w)`` logits to ``size = (H, W)``, ``align_corners=False``
        as transformers' SegFormer loss."""
        if logits.dim() != 4 or len(size) != 2:
            raise ValueError(
                f"logits must be (B, K, h, w) and size (H, W), got {tuple(logits.shape)}, {size}"
            )
        return F.interpolate(
            logits, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False
        )
