"""The segmenter interface a perturbed branch is written against, and the record of one pass.

    v = decoder_input(*encode(x)),    h = head(v),    logits = upsample(classifier(h), x.shape[-2:])

``v`` is where DDFP adds its perturbation and ``h`` is the space of the feature density, so the
perturbed branch is ``classifier(head(v + delta))``. The example DeepLabV3+
(``ddfp_examples.models.DeepLabV3Plus``) and every adapter of :mod:`ddfp_lib.adapters` satisfy
:class:`Segmenter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, cast, runtime_checkable

from torch import Tensor, nn

__all__ = ["Segmenter", "SegmenterOutput", "SplitSegmenter"]


class SegmenterOutput(NamedTuple):
    """One forward pass with the tensors a perturbed branch needs.

    Attributes:
        logits: class scores at input resolution, ``(B, K, H, W)``.
        v: decoder input (the perturbation point), ``(B, C_v, H/4, W/4)``; 304 channels for
            DeepLabV3+.
        h: head output (the density space), ``(B, C_h, H/4, W/4)``; 256 channels for DeepLabV3+.

    Examples:
        >>> import torch
        >>> v, h = torch.zeros(1, 304, 8, 8), torch.zeros(1, 256, 8, 8)
        >>> out = SegmenterOutput(logits=torch.zeros(1, 3, 32, 32), v=v, h=h)
        >>> tuple(out.h.shape)
        (1, 256, 8, 8)
    """

    logits: Tensor
    v: Tensor
    h: Tensor


@runtime_checkable
class Segmenter(Protocol):
    """A segmenter split where feature perturbations act: ``encode``, ``decoder_input``, ``decode``,
    ``upsample`` and ``forward_features``.

    ``decode(v)`` is ``classifier(head(v))``; the loop also reaches the two sub-modules ``head``
    (``v`` -> ``h``) and ``classifier`` (``h`` -> logits). They are not members of the protocol:
    from Python 3.12 on ``isinstance`` looks members up without ``nn.Module.__getattr__``, the only
    place that finds sub-modules.

    ``encode`` returns the encoder features the decoder reads, finest first: ``(low, high)`` for
    DeepLabV3+, one map per stage for FPN, UPerNet and SegFormer; ``decoder_input`` takes them in
    that order.

    Shape:
        - x: ``(B, 3, H, W)``; encode: a tuple of ``(B, C_i, H/s_i, W/s_i)``, DeepLabV3+'s
          ``(low, high)`` at stride 4 and at the output stride
        - decoder_input: ``v`` ``(B, C_v, H/4, W/4)``; decode: logits ``(B, K, H/4, W/4)``
        - upsample: ``(B, K, h, w)`` -> ``(B, K, H, W)``; forward_features: :class:`SegmenterOutput`

    References:
        Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
        Segmentation", ECCV 2018.

    Examples:
        >>> from ddfp_lib.adapters import build_smp_deeplabv3plus
        >>> smp_model = build_smp_deeplabv3plus("resnet18", num_classes=3, encoder_weights=None)
        >>> isinstance(smp_model, Segmenter), isinstance(smp_model.head, Segmenter)
        (True, False)
    """

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        """The encoder features the decoder reads, finest first (``(low, high)`` for DeepLabV3+)."""

    def decoder_input(self, *features: Tensor) -> Tensor:
        """The decoder input ``v`` built from ``encode``'s features, where the perturbation is added."""

    def decode(self, v: Tensor) -> Tensor:
        """Logits ``classifier(head(v))`` at ``v``'s resolution."""

    def upsample(self, logits: Tensor, size: Sequence[int]) -> Tensor:
        """Logits resized to ``size = (H, W)``."""

    def forward_features(self, x: Tensor) -> SegmenterOutput:
        """Full-resolution logits with ``v`` and ``h``."""


class SplitSegmenter(nn.Module):
    """The passes every split segmenter builds from its pieces; a subclass defines ``encode``,
    ``decoder_input``, ``head``, ``classifier`` and ``upsample`` (and ``decode``).

    ``forward_features(x)`` is ``v = decoder_input(*encode(x))``, ``h = head(v)``,
    ``logits = upsample(classifier(h), x.shape[-2:])``; ``forward(x)`` its logits.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> class Tiny(SplitSegmenter):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.stem, self.head, self.classifier = nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)
        ...     def encode(self, x):
        ...         return (self.stem(x),)
        ...     def decoder_input(self, features):
        ...         return features
        ...     def upsample(self, logits, size):
        ...         return nn.functional.interpolate(logits, size=tuple(size), mode="bilinear")
        >>> out = Tiny().forward_features(torch.zeros(1, 3, 8, 8))
        >>> tuple(out.logits.shape), tuple(out.v.shape), tuple(out.h.shape)
        ((1, 2, 8, 8), (1, 4, 4, 4), (1, 4, 4, 4))
    """

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def decoder_input(self, *features: Tensor) -> Tensor:
        raise NotImplementedError

    def upsample(self, logits: Tensor, size: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> SegmenterOutput:
        """Full-resolution logits with the decoder input ``v`` and the head output ``h``."""
        head, classifier = cast(nn.Module, self.head), cast(nn.Module, self.classifier)
        v = self.decoder_input(*self.encode(x))
        h = head(v)
        logits = self.upsample(classifier(h), x.shape[-2:])
        return SegmenterOutput(logits=logits, v=v, h=h)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K, H, W)`` at the input resolution."""
        return self.forward_features(x).logits
