"""The grounding head: DyHead tower plus box, centerness and token-alignment outputs (spec 3.2)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

from .dyhead import DyHead

__all__ = ["Scale", "GroundingHead"]

logger = logging.getLogger(__name__)


class Scale(nn.Module):
    """Multiplies its input by one learnable scalar ``scale`` (shape (1,))."""

    def __init__(self, init_value: float = 1.0):
        """
        Args:
            init_value: initial value of the scalar.
        """
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value], dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: any shape.

        Returns:
            ``x * scale``, same shape.
        """
        return x * self.scale


class GroundingHead(nn.Module):
    """DyHead tower and the per-level output branches of the fine-grained FIBER model.

    Token logits for level l: ``S_l = F_l P^T / exp(log_scale) + beta``, with
    ``e = normalize(text_embedded)``, ``P = dot_product_projection_text(e / 2)``,
    ``beta = e . bias_lang + bias0``, ``F_l`` the un-normalised tower output flattened row-major,
    clamped to ``+-clamp_dot_product``.
    """

    @configurable
    def __init__(
        self,
        *,
        dyhead_tower: nn.Module,
        in_channels: int = 256,
        num_levels: int = 5,
        num_classes: int = 81,
        text_dim: int = 768,
        prior_prob: float = 0.01,
        log_scale: float = 0.0,
        clamp_dot_product: float = 50000.0,
    ):
        """
        Args:
            dyhead_tower: the tower (usually :class:`DyHead`) mapping a list of levels to a list of
                levels of the same shapes.
            in_channels: width of every level.
            num_levels: number of pyramid levels (one regression scale each).
            num_classes: ``cls_logits`` gets ``num_classes - 1`` outputs (frozen, unused).
            text_dim: width of the text features.
            prior_prob: prior probability for the ``cls_logits`` and ``bias0`` initialisation.
            log_scale: initial log temperature of the token dot product.
            clamp_dot_product: token logits are clamped to ``[-clamp, clamp]``.
        """
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_levels = num_levels
        self.clamp_dot_product = clamp_dot_product
        self.dyhead_tower = dyhead_tower
        bias_value = -math.log((1.0 - prior_prob) / prior_prob)

        self.cls_logits = nn.Conv2d(in_channels, num_classes - 1, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=1)
        self.centerness = nn.Conv2d(in_channels, 1, kernel_size=1)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, bias_value)
        # The classic classifier is frozen; its loss is multiplied by 0 (spec 0, 3.5).
        for p in self.cls_logits.parameters():
            p.requires_grad_(False)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])

        self.dot_product_projection_text = nn.Linear(text_dim, in_channels, bias=True)
        self.log_scale = nn.Parameter(torch.tensor([log_scale], dtype=torch.float32))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([bias_value], dtype=torch.float32))

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Keyword arguments from ``cfg.MODEL.DYHEAD``, ``MODEL.ATSS`` and the text width."""
        return {
            "dyhead_tower": DyHead(cfg),
            "in_channels": cfg.MODEL.DYHEAD.CHANNELS,
            "num_levels": len(cfg.MODEL.ATSS.ANCHOR_STRIDES),
            "num_classes": cfg.MODEL.DYHEAD.NUM_CLASSES,
            "text_dim": cfg.MODEL.LANGUAGE_BACKBONE.HIDDEN_SIZE,
            "prior_prob": cfg.MODEL.DYHEAD.PRIOR_PROB,
            "log_scale": cfg.MODEL.DYHEAD.LOG_SCALE,
            "clamp_dot_product": cfg.MODEL.DYHEAD.CLAMP_DOT_PRODUCT,
        }

    def token_projection(self, text_embedded: Tensor) -> tuple[Tensor, Tensor]:
        """Projected tokens and per-token bias of the dot-product alignment.

        Args:
            text_embedded: text features with padding rows zeroed, shape (B, T, D).

        Returns:
            (tokens, bias): shapes (B, T, C) and (B, T).
        """
        normed = F.normalize(text_embedded, p=2, dim=-1)
        tokens = self.dot_product_projection_text(normed / 2.0)
        bias = torch.matmul(normed, self.bias_lang) + self.bias0
        return tokens, bias

    def token_logits(self, feature: Tensor, tokens: Tensor, bias: Tensor) -> Tensor:
        """Alignment logits of one level.

        Args:
            feature: tower output, shape (B, C, H, W).
            tokens: projected tokens, shape (B, T, C).
            bias: per-token bias, shape (B, T).

        Returns:
            Tensor of shape (B, H*W, T), anchors in (y, x) row-major order.
        """
        queries = feature.flatten(2).transpose(1, 2)
        logits = torch.matmul(queries, tokens.transpose(1, 2)) / self.log_scale.exp()
        logits = logits + bias[:, None, :]
        return logits.clamp(min=-self.clamp_dot_product, max=self.clamp_dot_product)

    def forward(self, features: list[Tensor], text_embedded: Tensor) -> dict[str, list[Tensor]]:
        """
        Args:
            features: FPN levels P3..P7, each of shape (B, C, H_l, W_l).
            text_embedded: text features (pads zeroed), shape (B, T, D).

        Returns:
            dict with, per level l:
                "box_regression": list of (B, 4, H_l, W_l) box-coder deltas;
                "centerness": list of (B, 1, H_l, W_l) logits;
                "token_logits": list of (B, H_l*W_l, T) alignment logits;
                "cls_logits": list of (B, num_classes - 1, H_l, W_l) (frozen, unused).
        """
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
        if text_embedded.dim() != 3 or text_embedded.shape[0] != features[0].shape[0]:
            raise ValueError(
                f"text_embedded must be (B, T, D) with B={features[0].shape[0]}, "
                f"got {tuple(text_embedded.shape)}"
            )
        tower = self.dyhead_tower(features)
        tokens, bias = self.token_projection(text_embedded)
        out: dict[str, list[Tensor]] = {
            "box_regression": [],
            "centerness": [],
            "token_logits": [],
            "cls_logits": [],
        }
        for level, feature in enumerate(tower):
            out["box_regression"].append(self.scales[level](self.bbox_pred(feature)))
            out["centerness"].append(self.centerness(feature))
            out["token_logits"].append(self.token_logits(feature, tokens, bias))
            out["cls_logits"].append(self.cls_logits(feature))
        return out
