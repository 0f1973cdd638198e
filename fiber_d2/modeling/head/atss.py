"""Anchors, the legacy box coder, ATSS assignment and the grounding losses (spec 3.3-3.5).

All boxes here are xyxy in the legacy "+1" convention: a box ``[x1, y1, x2, y2]`` covers
``x2 - x1 + 1`` pixels horizontally. Ground-truth boxes must already be in that convention.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

__all__ = [
    "generate_anchors",
    "LegacyBoxCoder",
    "legacy_box_iou",
    "atss_assign",
    "centerness_targets",
    "ATSSLossComputation",
]

logger = logging.getLogger(__name__)


def generate_anchors(
    feature_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    sizes: Sequence[float],
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """One square anchor per feature-map location, legacy construction.

    The base anchor of a level is centred on the cell ``[0, 0, s-1, s-1]`` (centre ``(s-1)/2``)
    with side ``size``: ``centre +- (size-1)/2``; it is shifted by ``stride`` per location, rows
    first (y-major). Stride 8, size 64 gives ``[-28, -28, 35, 35]`` at location (0, 0).

    Args:
        feature_shapes: (H_l, W_l) per level.
        strides: stride per level.
        sizes: anchor side per level.
        device: device of the result.

    Returns:
        list of Tensors of shape (H_l*W_l, 4), float32 xyxy.
    """
    if not (len(feature_shapes) == len(strides) == len(sizes)):
        raise ValueError(
            f"got {len(feature_shapes)} feature shapes, {len(strides)} strides, {len(sizes)} sizes"
        )
    anchors = []
    for (height, width), stride, size in zip(feature_shapes, strides, sizes):
        centre = (stride - 1) / 2.0
        half = (size - 1) / 2.0
        base = torch.tensor(
            [centre - half, centre - half, centre + half, centre + half],
            dtype=torch.float32,
            device=device,
        )
        shift_y = torch.arange(height, dtype=torch.float32, device=device) * stride
        shift_x = torch.arange(width, dtype=torch.float32, device=device) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 4)
        anchors.append(shifts + base)
    return anchors


class LegacyBoxCoder:
    """Box coder with the legacy +1 widths: deltas (dx, dy, dw, dh) scaled by ``weights``.

    Centres are ``(x1 + x2) / 2``; widths ``x2 - x1 + 1``; decoding gives
    ``centre +- (w - 1) / 2`` and clamps dw, dh at ``log(1000 / 16)``.
    """

    def __init__(
        self,
        weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        scale_clamp: float = math.log(1000.0 / 16),
    ):
        """
        Args:
            weights: (wx, wy, ww, wh).
            scale_clamp: upper clamp of dw, dh before the exponential.
        """
        if len(weights) != 4:
            raise ValueError(f"box coder needs 4 weights, got {len(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        widths = boxes[:, 2] - boxes[:, 0] + 1
        heights = boxes[:, 3] - boxes[:, 1] + 1
        ctr_x = (boxes[:, 0] + boxes[:, 2]) / 2
        ctr_y = (boxes[:, 1] + boxes[:, 3]) / 2
        return ctr_x, ctr_y, widths, heights

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """
        Args:
            gt_boxes: target boxes, shape (N, 4).
            anchors: reference boxes, shape (N, 4).

        Returns:
            deltas of shape (N, 4).
        """
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors)
        gx, gy, gw, gh = self._centre_size(gt_boxes)
        return torch.stack(
            [
                wx * (gx - ax) / aw,
                wy * (gy - ay) / ah,
                ww * torch.log(gw / aw),
                wh * torch.log(gh / ah),
            ],
            dim=1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """
        Args:
            deltas: shape (N, 4).
            anchors: reference boxes, shape (N, 4).

        Returns:
            boxes of shape (N, 4) in the dtype of ``deltas``.
        """
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors)
        dx = deltas[:, 0] / wx
        dy = deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3] / wh).clamp(max=self.scale_clamp)
        cx = dx * aw + ax
        cy = dy * ah + ay
        half_w = (torch.exp(dw) * aw - 1) / 2
        half_h = (torch.exp(dh) * ah - 1) / 2
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)


def legacy_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU with the +1 area convention (``area = (x2 - x1 + 1) * (y2 - y1 + 1)``).

    Args:
        boxes1: shape (N, 4).
        boxes2: shape (M, 4).

    Returns:
        Tensor of shape (N, M).
    """
    plus = boxes1.new_tensor([0.0, 0.0, 1.0, 1.0])
    return box_iou(boxes1 + plus, boxes2 + plus)


def _centres(boxes: Tensor) -> Tensor:
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)


def centre_distances(points: Tensor, centres: Tensor) -> Tensor:
    """Euclidean distances (P, C) between ``points`` (P, 2) and ``centres`` (C, 2), from the
    coordinate differences, as the original computes them. ``torch.cdist`` takes a matrix-product
    path for more than 25 points, whose float32 error at image coordinates (about 0.01 px at 1,300
    px, more near zero distance) can reorder the ATSS candidates at a near-tie."""
    return (points[:, None, :] - centres[None, :, :]).pow(2).sum(-1).sqrt()


def atss_assign(anchors_per_level: Sequence[Tensor], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """Adaptive training-sample selection for one image.

    For each GT: the ``topk`` anchors per level whose centres are closest to the GT centre are
    candidates; a candidate is positive if its (+1) IoU is >= mean + unbiased std of the
    candidates' IoUs and its centre lies inside the GT with ``min(l, t, r, b) > 0.01``. An anchor
    positive for several GTs takes the one with the largest IoU.

    Args:
        anchors_per_level: anchors of each level, shapes (A_l, 4).
        gt_boxes: GT boxes (legacy convention), shape (G, 4).
        topk: candidates per level and GT.

    Returns:
        LongTensor of shape (A,) with A = sum A_l: the matched GT index, or -1.
    """
    anchors = torch.cat(list(anchors_per_level), dim=0)
    num_anchors = anchors.shape[0]
    if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes must have shape (G, 4), got {tuple(gt_boxes.shape)}")
    num_gt = gt_boxes.shape[0]
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matched
    gt_boxes = gt_boxes.to(anchors)
    ious = legacy_box_iou(anchors, gt_boxes)  # (A, G)
    anchor_ctr = _centres(anchors)
    distances = centre_distances(anchor_ctr, _centres(gt_boxes))  # (A, G)

    candidates = []
    start = 0
    for level_anchors in anchors_per_level:
        end = start + level_anchors.shape[0]
        k = min(topk, end - start)
        if k > 0:
            _, idx = distances[start:end].topk(k, dim=0, largest=False)
            candidates.append(idx + start)
        start = end
    candidates = torch.cat(candidates, dim=0)  # (K, G)
    cand_ious = ious.gather(0, candidates)
    # With a single candidate the unbiased std is NaN and nothing is positive, as in the original.
    threshold = cand_ious.mean(dim=0) + cand_ious.std(dim=0)
    is_pos = cand_ious >= threshold[None, :]

    cx = anchor_ctr[:, 0][candidates]
    cy = anchor_ctr[:, 1][candidates]
    dist_to_sides = torch.stack(
        [
            cx - gt_boxes[None, :, 0],
            cy - gt_boxes[None, :, 1],
            gt_boxes[None, :, 2] - cx,
            gt_boxes[None, :, 3] - cy,
        ],
        dim=0,
    )
    is_pos &= dist_to_sides.amin(dim=0) > 0.01

    masked = torch.full_like(ious, -math.inf)
    gt_idx = torch.arange(num_gt, device=anchors.device).expand_as(candidates)
    rows, cols = candidates[is_pos], gt_idx[is_pos]
    masked[rows, cols] = ious[rows, cols]
    best, best_idx = masked.max(dim=1)
    matched = torch.where(best > -math.inf, best_idx, matched)
    return matched


def centerness_targets(gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` from the anchor centre to the GT.

    Args:
        gt_boxes: matched GT boxes, shape (N, 4).
        anchors: anchors, shape (N, 4).

    Returns:
        Tensor of shape (N,).
    """
    ctr = _centres(anchors)
    left = ctr[:, 0] - gt_boxes[:, 0]
    top = ctr[:, 1] - gt_boxes[:, 1]
    right = gt_boxes[:, 2] - ctr[:, 0]
    bottom = gt_boxes[:, 3] - ctr[:, 1]
    lr = torch.minimum(left, right) / torch.maximum(left, right)
    tb = torch.minimum(top, bottom) / torch.maximum(top, bottom)
    return torch.sqrt(lr * tb)


def _reduce_mean(value: Tensor) -> Tensor:
    """Average of a scalar tensor over all processes (itself when not distributed)."""
    world = comm.get_world_size()
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / world
    return value


def _field(target: Any, name: str, image: int) -> Tensor:
    if isinstance(target, Mapping):
        if name not in target:
            raise KeyError(f"target of image {image} has no '{name}'")
        value = target[name]
    elif hasattr(target, name):
        value = getattr(target, name)
    else:
        raise KeyError(f"target of image {image} has no '{name}'")
    return value.tensor if hasattr(value, "tensor") else value


class ATSSLossComputation:
    """ATSS assignment plus the token focal loss, GIoU box loss and centerness loss (spec 3.5).

    Called with anchors shared by the batch, the :class:`GroundingHead` outputs, one target per
    image and the text mask; returns ``loss_dot_product_token``, ``loss_reg``,
    ``loss_centerness`` and ``loss_cls`` (zero, for graph completeness).
    """

    @configurable
    def __init__(
        self,
        *,
        box_coder: LegacyBoxCoder,
        topk: int = 9,
        token_alpha: float = 0.25,
        token_gamma: float = 2.0,
        token_loss_weight: float = 1.0,
        reg_loss_weight: float = 2.0,
        centerness_loss_weight: float = 1.0,
        max_query_len: int | None = None,
    ):
        """
        Args:
            box_coder: the legacy box coder.
            topk: ATSS candidates per level and GT.
            token_alpha: focal-loss alpha of the token loss.
            token_gamma: focal-loss gamma of the token loss.
            token_loss_weight: weight of ``loss_dot_product_token``.
            reg_loss_weight: weight of ``loss_reg``.
            centerness_loss_weight: weight of ``loss_centerness``.
            max_query_len: T of the tokenizer (``MAX_QUERY_LEN``). The original marks unmatched
                anchors with a 1 in token column T - 1 ("no object"), a padding column unless a
                prompt fills all T tokens, and the loss masks padding. A batch cut to T' < T
                tokens (``INPUT.PAD_TO_MAX_QUERY_LEN`` False) has no such column, so nothing is
                marked there; its last column can be a real token. None: the logits' width is T.
        """
        self.box_coder = box_coder
        self.topk = topk
        self.token_alpha = token_alpha
        self.token_gamma = token_gamma
        self.token_loss_weight = token_loss_weight
        self.reg_loss_weight = reg_loss_weight
        self.centerness_loss_weight = centerness_loss_weight
        self.max_query_len = max_query_len

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Keyword arguments from ``cfg.MODEL.ATSS`` and ``cfg.MODEL.DYHEAD``."""
        return {
            "box_coder": LegacyBoxCoder(cfg.MODEL.ATSS.BBOX_REG_WEIGHTS),
            "topk": cfg.MODEL.ATSS.TOPK,
            "token_alpha": cfg.MODEL.DYHEAD.TOKEN_ALPHA,
            "token_gamma": cfg.MODEL.DYHEAD.TOKEN_GAMMA,
            "token_loss_weight": cfg.MODEL.DYHEAD.TOKEN_LOSS_WEIGHT,
            "reg_loss_weight": cfg.MODEL.ATSS.REG_LOSS_WEIGHT,
            "centerness_loss_weight": cfg.MODEL.ATSS.CENTERNESS_LOSS_WEIGHT,
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
        }

    def prepare_targets(
        self, anchors_per_level: Sequence[Tensor], targets: Sequence[Any], num_tokens: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Assign anchors to GTs and build token and box targets.

        Args:
            anchors_per_level: anchors shared by the batch, shapes (A_l, 4).
            targets: per image, ``gt_boxes`` (G, 4) legacy xyxy and ``positive_map`` (G, T) bool.
            num_tokens: T, the width of the token logits.

        Returns:
            (matched, token_targets, gt_per_anchor): shapes (B, A) long (GT index or -1),
            (B, A, T) float binary, (B, A, 4) matched GT boxes (zeros where unmatched).
        """
        anchors = torch.cat(list(anchors_per_level), dim=0)
        matched_all, tokens_all, boxes_all = [], [], []
        for i, target in enumerate(targets):
            gt_boxes = _field(target, "gt_boxes", i).to(anchors)
            positive_map = _field(target, "positive_map", i).to(anchors.device)
            if positive_map.dim() != 2 or positive_map.shape != (gt_boxes.shape[0], num_tokens):
                raise ValueError(
                    f"image {i}: positive_map shape {tuple(positive_map.shape)} does not match "
                    f"({gt_boxes.shape[0]}, {num_tokens})"
                )
            matched = atss_assign(anchors_per_level, gt_boxes, self.topk)
            pos = matched >= 0
            tokens = anchors.new_zeros(anchors.shape[0], num_tokens)
            if self.max_query_len is None or num_tokens == self.max_query_len:
                tokens[:, -1] = 1.0  # "no object" slot of unmatched anchors (token T - 1)
            tokens[pos] = (positive_map[matched[pos]] > 0).to(tokens)
            boxes = anchors.new_zeros(anchors.shape[0], 4)
            boxes[pos] = gt_boxes[matched[pos]]
            matched_all.append(matched)
            tokens_all.append(tokens)
            boxes_all.append(boxes)
        return torch.stack(matched_all), torch.stack(tokens_all), torch.stack(boxes_all)

    def __call__(
        self,
        anchors_per_level: Sequence[Tensor],
        head_outputs: Mapping[str, Sequence[Tensor]],
        targets: Sequence[Any],
        text_mask: Tensor,
    ) -> dict[str, Tensor]:
        """
        Args:
            anchors_per_level: anchors shared by the batch, shapes (A_l, 4), A_l = H_l*W_l.
            head_outputs: :class:`GroundingHead` outputs ("box_regression", "centerness",
                "token_logits", optional "cls_logits").
            targets: per image, ``gt_boxes`` (G, 4) legacy xyxy and ``positive_map`` (G, T).
            text_mask: real-token mask, shape (B, T) (nonzero = real token).

        Returns:
            dict of scalar losses.
        """
        with torch.autocast(device_type=text_mask.device.type, enabled=False):
            return self._losses(anchors_per_level, head_outputs, targets, text_mask)

    def _losses(self, anchors_per_level, head_outputs, targets, text_mask) -> dict[str, Tensor]:
        token_logits = torch.cat([t.float() for t in head_outputs["token_logits"]], dim=1)
        batch, num_anchors, num_tokens = token_logits.shape
        box_reg = torch.cat(
            [
                r.float().permute(0, 2, 3, 1).reshape(batch, -1, 4)
                for r in head_outputs["box_regression"]
            ],
            dim=1,
        )
        ctr_pred = torch.cat(
            [c.float().permute(0, 2, 3, 1).reshape(batch, -1) for c in head_outputs["centerness"]],
            dim=1,
        )
        anchors = torch.cat([a.float() for a in anchors_per_level], dim=0)
        if anchors.shape[0] != num_anchors or box_reg.shape[1] != num_anchors:
            raise ValueError(
                f"{anchors.shape[0]} anchors, {box_reg.shape[1]} box predictions and "
                f"{num_anchors} token-logit rows per image must agree"
            )
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch}")
        if text_mask.shape != (batch, num_tokens):
            raise ValueError(f"text_mask shape {tuple(text_mask.shape)} != ({batch}, {num_tokens})")

        matched, token_targets, gt_per_anchor = self.prepare_targets(
            anchors_per_level, targets, num_tokens
        )
        pos = matched >= 0
        num_pos = _reduce_mean(pos.sum().float())
        n_pos = max(num_pos.item(), 1.0)

        keep = (text_mask > 0)[:, None, :].expand(-1, num_anchors, -1)
        focal = sigmoid_focal_loss(
            token_logits[keep],
            token_targets[keep],
            alpha=self.token_alpha,
            gamma=self.token_gamma,
            reduction="sum",
        )
        losses = {"loss_dot_product_token": focal / n_pos * self.token_loss_weight}

        pos_anchors = anchors[None].expand(batch, -1, -1)[pos]
        pos_gt = gt_per_anchor[pos]
        reg_targets = self.box_coder.encode(pos_gt, pos_anchors)
        ctr_targets = centerness_targets(
            self.box_coder.decode(reg_targets, pos_anchors), pos_anchors
        )
        # Reduced by every process, with or without local positives.
        ctr_norm = _reduce_mean(ctr_targets.sum().detach()).item()
        if pos.any():
            pred_boxes = self.box_coder.decode(box_reg[pos], pos_anchors)
            pred_boxes = torch.cat(
                [pred_boxes[:, :2], torch.maximum(pred_boxes[:, :2], pred_boxes[:, 2:])], dim=1
            )
            target_boxes = self.box_coder.decode(reg_targets, pos_anchors)
            giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none", eps=1e-7)
            losses["loss_reg"] = (giou * ctr_targets).sum() / ctr_norm * self.reg_loss_weight
            bce = F.binary_cross_entropy_with_logits(ctr_pred[pos], ctr_targets, reduction="sum")
            losses["loss_centerness"] = bce / n_pos * self.centerness_loss_weight
        else:
            losses["loss_reg"] = 0.0 * box_reg.sum()
            losses["loss_centerness"] = 0.0 * ctr_pred.sum()
        cls_logits = head_outputs.get("cls_logits") or []
        losses["loss_cls"] = sum((0.0 * c.float().sum() for c in cls_logits), box_reg.new_zeros(()))
        return losses
