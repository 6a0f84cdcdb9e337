"""Adapters that expose other segmenters' decoders in the pieces a perturbed branch needs.

Import this package explicitly (``from ddfp_lib.adapters import SMPDeepLabV3Plus``); ``import
ddfp_lib`` does not, and segmentation_models_pytorch is imported only when an adapter is built.
"""

from .smp import SegmenterOutput, SMPDeepLabV3Plus, build_smp_deeplabv3plus

__all__ = ["SMPDeepLabV3Plus", "SegmenterOutput", "build_smp_deeplabv3plus"]
