"""FIBER's FPN on the fused backbone (fine-grained spec §2): detectron2's FPN with P6/P7 from
P5, text passed through to the fused bottom-up network, exact-size top-down resize, and FIBER's
DropBlock on the merged P3/P4 maps during training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from torch import nn

from .fused import FusedSwinRoberta, FusionPrefix

__all__ = ["DropBlock2d", "FIBERFPN", "build_fiber_swin_roberta_fpn_backbone"]

logger = logging.getLogger(__name__)


class DropBlock2d(nn.Module):
    """DropBlock in FIBER's formulation (the ``dropblock`` package's, used by the original).

    Seeds are drawn per image and position with rate ``p / block_size**2``, grown to
    ``block_size`` squares by max-pooling, and one spatial mask per image is shared by all
    channels; the output is rescaled by (mask elements / kept elements) over the whole batch.
    ``torchvision.ops.drop_block2d`` differs (per-channel masks, edge-corrected rate), hence this
    module. The mask and its count are float32, as in the original, so that a half-precision input
    (autocast) cannot overflow the count (fp16 ends at 65,504 kept positions, fewer than a batch of
    8 P3 maps at 1333 x 800 holds); a half input therefore comes out float32, as the original's
    does. Identity in eval mode.
    """

    def __init__(self, p: float = 0.3, block_size: int = 3):
        """
        Args:
            p: drop probability.
            block_size: side of the dropped squares.
        """
        super().__init__()
        if not 0.0 <= p <= 1.0 or block_size < 1:
            raise ValueError(
                f"DropBlock needs 0 <= p <= 1 and block_size >= 1, got {p}, {block_size}"
            )
        self.p = p
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, C, H, W).

        Returns:
            (B, C, H, W) with blocks zeroed and the rest rescaled (training), or ``x`` (eval).
        """
        if not self.training or self.p == 0.0:
            return x
        gamma = self.p / self.block_size**2
        seeds = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < gamma).float()
        dropped = F.max_pool2d(seeds, self.block_size, stride=1, padding=self.block_size // 2)
        if self.block_size % 2 == 0:
            dropped = dropped[:, :, :-1, :-1]
        keep = 1.0 - dropped
        # Guard: if every position is dropped the original divides by zero; we return zeros.
        scale = keep.numel() / keep.sum().clamp(min=1.0)
        return x * keep * scale


class FIBERFPN(FPN):
    """detectron2 FPN over :class:`FusedSwinRoberta` that also carries the text.

    ``forward(images, input_ids, attention_mask)`` returns ``({"p3".."p7"}, text)`` with
    ``text = {"hidden", "mask", "embedded"}``.
    """

    @configurable
    def __init__(
        self,
        *,
        bottom_up: FusedSwinRoberta,
        in_features: Sequence[str] = ("res3", "res4", "res5"),
        out_channels: int = 256,
        drop_block: bool = True,
        drop_block_prob: float = 0.3,
        drop_block_size: int = 3,
    ):
        """
        Args:
            bottom_up: the fused backbone.
            in_features: its outputs used by the FPN (stride 8, 16, 32 for FIBER).
            out_channels: FPN width.
            drop_block: apply DropBlock to the merged maps of every level but the coarsest
                (P3/P4), in training only.
            drop_block_prob: DropBlock probability.
            drop_block_size: DropBlock block side.
        """
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise KeyError(
                f"FPN input(s) {missing} not produced by the backbone ({sorted(shapes)})"
            )
        top_level = int(math.log2(shapes[in_features[-1]].stride))
        super().__init__(
            bottom_up=bottom_up,
            in_features=list(in_features),
            out_channels=out_channels,
            norm="",
            # P6 from the P5 *output* (FIBER's in_channels == out_channels case), P7 from ReLU(P6)
            top_block=LastLevelP6P7(out_channels, out_channels, in_feature=f"p{top_level}"),
            fuse_type="sum",
        )
        self.drop_block = DropBlock2d(drop_block_prob, drop_block_size) if drop_block else None

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec | None = None) -> dict:
        if input_shape is not None and input_shape.channels not in (None, 3):
            raise ValueError(f"FIBER's backbone takes 3-channel images, got {input_shape.channels}")
        fpn = cfg.MODEL.FPN
        return {
            "bottom_up": FusedSwinRoberta(cfg),
            "in_features": tuple(fpn.IN_FEATURES),
            "out_channels": fpn.OUT_CHANNELS,
            "drop_block": fpn.DROP_BLOCK,
            "drop_block_prob": fpn.DROP_BLOCK_PROB,
            "drop_block_size": fpn.DROP_BLOCK_SIZE,
        }

    def forward(
        self,
        x: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        fuse: bool | None = None,
        prefix: FusionPrefix | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """
        Args:
            x: (B, 3, H, W) images, H and W multiples of :attr:`size_divisibility` (32).
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens.
            fuse: see :meth:`FusedSwinRoberta.forward`.
            prefix: a precomputed fusion prefix, see :meth:`FusedSwinRoberta.forward`.

        Returns:
            features {"p3".."p7": (B, out_channels, ceil(H / 2**l), ceil(W / 2**l))} and text
            {"hidden": (B, T', D), "mask": (B, T'), "embedded": (B, T', D) hidden with padded rows
            zeroed}, T' = T truncated to the text tower's maximum length.
        """
        bottom_up, text = self.bottom_up(x, input_ids, attention_mask, fuse=fuse, prefix=prefix)
        prev = self.lateral_convs[0](bottom_up[self.in_features[-1]])
        results = [self.output_convs[0](prev)]
        for idx in range(1, len(self.lateral_convs)):
            lateral = self.lateral_convs[idx](bottom_up[self.in_features[-idx - 1]])
            prev = lateral + F.interpolate(prev, size=lateral.shape[-2:], mode="nearest")
            # DropBlock reaches this level's output conv only; the top-down map passed on to the
            # next level stays whole, as in the original
            dropped = prev if self.drop_block is None else self.drop_block(prev)
            results.insert(0, self.output_convs[idx](dropped))
        results.extend(self.top_block(results[self._out_features.index(self.top_block.in_feature)]))
        features = dict(zip(self._out_features, results))
        mask = text["mask"]
        text = dict(text)
        text["embedded"] = text["hidden"] * mask.unsqueeze(-1).to(text["hidden"].dtype)
        return features, text


@BACKBONE_REGISTRY.register()
def build_fiber_swin_roberta_fpn_backbone(cfg, input_shape: ShapeSpec) -> FIBERFPN:
    """Build FIBER's fused Swin-RoBERTa backbone with its FPN (P3-P7).

    Args:
        cfg: a detectron2 config with :func:`fiber_d2.add_fiber_config` keys.
        input_shape: the image input shape (3 channels).

    Returns:
        the :class:`FIBERFPN`; call it as ``features, text = backbone(images, ids, mask)``.
    """
    return FIBERFPN(cfg, input_shape)
