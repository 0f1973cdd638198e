"""The grounding head: DyHead tower, token-alignment outputs, ATSS losses, post-processing."""

from .atss import (
    ATSSLossComputation,
    LegacyBoxCoder,
    atss_assign,
    centerness_targets,
    generate_anchors,
    legacy_box_iou,
)
from .dyhead import DyConv, DyHead, DyReLU, modulated_deform_conv3x3
from .grounding_head import GroundingHead, Scale
from .postprocess import ground_inference, label_scores

__all__ = [
    "ATSSLossComputation",
    "DyConv",
    "DyHead",
    "DyReLU",
    "GroundingHead",
    "LegacyBoxCoder",
    "Scale",
    "atss_assign",
    "centerness_targets",
    "generate_anchors",
    "ground_inference",
    "label_scores",
    "legacy_box_iou",
    "modulated_deform_conv3x3",
]
