"""Adapters that expose other segmenters' decoders in the pieces a perturbed branch needs.

:class:`Segmenter` is the interface those pieces form; the adapters satisfy it:
:class:`SMPDeepLabV3Plus`, :class:`SMPFPN` and :class:`SMPUPerNet` for segmentation_models_pytorch
(any encoder, timm's ``tu-`` ones included) and :class:`HFSegformer` for Hugging Face transformers'
SegFormer.

Import this package explicitly (``from ddfp_lib.adapters import SMPDeepLabV3Plus``); ``import
ddfp_lib`` does not, and segmentation_models_pytorch or transformers is imported only when an
adapter that needs it is built.
"""

from .segformer import HFSegformer, SegformerFuse
from .segmenter import Segmenter, SegmenterOutput, SplitSegmenter
from .smp import SMPFPN, SMPDeepLabV3Plus, SMPUPerNet, build_smp_deeplabv3plus

__all__ = [
    "HFSegformer",
    "SMPDeepLabV3Plus",
    "SMPFPN",
    "SMPUPerNet",
    "SegformerFuse",
    "Segmenter",
    "SegmenterOutput",
    "SplitSegmenter",
    "build_smp_deeplabv3plus",
]
