"""The fused Swin-RoBERTa backbone (fusion in the backbone) and its FPN."""

from .fpn import FIBERFPN, DropBlock2d, build_fiber_swin_roberta_fpn_backbone
from .fused import FusedSwinRoberta, FusionPrefix, FusionStep, fusion_schedule
from .naming import original_to_fiber_d2_key
from .roberta import FusedRobertaLayer, RobertaTextTower
from .swin import FIBERSwinBlock, FusedWindowAttention, SwinImageTower

__all__ = [
    "DropBlock2d",
    "FIBERFPN",
    "FIBERSwinBlock",
    "FusedRobertaLayer",
    "FusedSwinRoberta",
    "FusedWindowAttention",
    "FusionPrefix",
    "FusionStep",
    "RobertaTextTower",
    "SwinImageTower",
    "build_fiber_swin_roberta_fpn_backbone",
    "fusion_schedule",
    "original_to_fiber_d2_key",
]
