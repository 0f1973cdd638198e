"""Inference post-processing of the grounding head: token scores -> labelled boxes (spec 4.2)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from detectron2.structures import Boxes, Instances
from torch import Tensor
from torchvision.ops import batched_nms

from .atss import LegacyBoxCoder

__all__ = ["label_scores", "ground_inference", "to_image_frame", "original_eval_boxes"]

logger = logging.getLogger(__name__)


# token -> label score aggregations (MODEL.DYHEAD.SCORE_AGG)
SCORE_AGGREGATIONS = ("MEAN", "MAX")


def label_scores(probs: Tensor, label_token_map: Tensor, score_agg: str = "MEAN") -> Tensor:
    """Aggregate per-token probabilities into per-label scores.

    Args:
        probs: token probabilities, shape (A, T).
        label_token_map: tokens of each label, shape (L, T) (nonzero = token belongs to the label).
        score_agg: "MEAN" (mean over the label's tokens) or "MAX".

    Returns:
        Tensor of shape (A, L); a label without tokens scores 0.
    """
    if probs.shape[-1] != label_token_map.shape[-1]:
        raise ValueError(
            f"label map has {label_token_map.shape[-1]} tokens, probabilities have {probs.shape[-1]}"
        )
    member = label_token_map > 0
    if score_agg == "MEAN":
        counts = member.sum(dim=1).to(probs.dtype)
        sums = probs @ member.to(probs.dtype).t()
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    if score_agg == "MAX":
        scores = probs.new_zeros(probs.shape[0], member.shape[0])
        for label, row in enumerate(member):
            if row.any():
                scores[:, label] = probs[:, row].amax(dim=1)
        return scores
    raise ValueError(f"unknown score_agg '{score_agg}', expected {' or '.join(SCORE_AGGREGATIONS)}")


def _level_candidates(
    anchors: Tensor,
    box_regression: Tensor,
    centerness: Tensor,
    token_logits: Tensor,
    label_map: Tensor,
    image_size: tuple[int, int],
    box_coder: LegacyBoxCoder,
    score_threshold: float,
    pre_nms_top_n: int,
    score_agg: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Thresholded, top-k candidates of one level and one image.

    Args:
        anchors: shape (A_l, 4).
        box_regression: shape (4, H, W).
        centerness: shape (1, H, W).
        token_logits: shape (A_l, T).
        label_map: shape (L, T) bool.
        image_size: (h, w) for clipping.
        box_coder: decodes the regression.
        score_threshold: label-score threshold (before the centerness product).
        pre_nms_top_n: candidates kept.
        score_agg: token aggregation.

    Returns:
        (boxes (K, 4), scores (K,), labels (K,) long).
    """
    scores = label_scores(token_logits.float().sigmoid(), label_map, score_agg)
    ctr = centerness.float().reshape(-1).sigmoid()
    candidates = scores > score_threshold
    ranked = (scores * ctr[:, None])[candidates]
    loc, labels = candidates.nonzero(as_tuple=True)
    k = min(pre_nms_top_n, ranked.numel())
    ranked, top = ranked.topk(k)
    loc, labels = loc[top], labels[top]
    deltas = box_regression.float().permute(1, 2, 0).reshape(-1, 4)[loc]
    boxes = box_coder.decode(deltas, anchors[loc].float())
    height, width = image_size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height - 1)
    return boxes, torch.sqrt(ranked), labels


@torch.no_grad()
def ground_inference(
    anchors: Sequence[Tensor],
    head_outputs: Mapping[str, Sequence[Tensor]],
    label_token_maps: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    text_masks: Tensor | None,
    *,
    score_threshold: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_threshold: float = 0.6,
    detections_per_img: int = 100,
    score_agg: str = "MEAN",
    box_coder: LegacyBoxCoder | None = None,
) -> list[Instances]:
    """Turn grounding-head outputs into per-image detections.

    Per level: sigmoid over tokens, per-label aggregation, ``score > score_threshold`` (before
    the centerness product), top ``pre_nms_top_n`` by ``score * sigmoid(ctr)``, final score
    ``sqrt(score * sigmoid(ctr))``, decode and clip. Across levels: class-aware NMS with the +1
    IoU convention, then the best ``detections_per_img`` (a k-th-value cut, so ties at the cut
    are all kept, as in the original).

    Args:
        anchors: anchors shared by the batch, per level (A_l, 4).
        head_outputs: :class:`GroundingHead` outputs ("box_regression" (B, 4, H_l, W_l),
            "centerness" (B, 1, H_l, W_l), "token_logits" (B, A_l, T)).
        label_token_maps: per image, the tokens of each label, shape (L, T).
        image_sizes: per image, (h, w) of the resized, un-padded image.
        text_masks: real-token mask (B, T), or None; tokens outside it never count for a label.
        score_threshold: label-score threshold.
        pre_nms_top_n: candidates per level and image.
        nms_threshold: IoU threshold of the class-aware NMS.
        detections_per_img: detections kept per image; <= 0 keeps all.
        score_agg: "MEAN" or "MAX".
        box_coder: box coder (default weights (10, 10, 5, 5)).

    Returns:
        list of Instances with ``pred_boxes`` (Boxes, legacy xyxy in the resized frame),
        ``scores`` and ``pred_classes`` (0-based row of the label map).
    """
    box_coder = box_coder or LegacyBoxCoder()
    token_logits = head_outputs["token_logits"]
    num_images = token_logits[0].shape[0]
    if len(label_token_maps) != num_images or len(image_sizes) != num_images:
        raise ValueError(
            f"{num_images} images but {len(label_token_maps)} label maps and "
            f"{len(image_sizes)} image sizes"
        )
    results = []
    for i in range(num_images):
        label_map = label_token_maps[i].to(token_logits[0].device) > 0
        if text_masks is not None:
            label_map = label_map & (text_masks[i] > 0)[None, :]
        parts = [
            _level_candidates(
                anchors[level],
                head_outputs["box_regression"][level][i],
                head_outputs["centerness"][level][i],
                token_logits[level][i],
                label_map,
                image_sizes[i],
                box_coder,
                score_threshold,
                pre_nms_top_n,
                score_agg,
            )
            for level in range(len(anchors))
        ]
        boxes = torch.cat([p[0] for p in parts])
        scores = torch.cat([p[1] for p in parts])
        labels = torch.cat([p[2] for p in parts])
        plus = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
        keep = batched_nms(boxes + plus, scores, labels, nms_threshold)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        num = scores.numel()
        if 0 < detections_per_img < num:
            cut = torch.kthvalue(scores.cpu(), num - detections_per_img + 1).values.item()
            keep = scores >= cut
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        inst = Instances(tuple(image_sizes[i]))
        inst.pred_boxes = Boxes(boxes)
        inst.scores = scores
        inst.pred_classes = labels
        results.append(inst)
    return results


def to_image_frame(result: Instances, height: int, width: int) -> Instances:
    """Detections in the network input's frame (legacy xyxy, x2 = x + w - 1, clipped to that frame)
    as detectron2 boxes on the ``height`` x ``width`` image, with the original's arithmetic.

    The original scales the legacy box as it is (maskrcnn-benchmark's ``BoxList.resize``) and counts
    the last pixel afterwards (its COCO evaluation's width ``x2 - x1 + 1``): scale, then +1 on x2 and
    y2. Unlike detectron2's ``detector_postprocess`` (+1 first, then scale, clip, drop empty boxes)
    nothing is clipped or dropped after the scaling, as in the original, so a box on the right or
    bottom edge can end less than a pixel beyond the image.

    Args:
        result: ``pred_boxes`` (N, 4) legacy xyxy in the frame of ``result.image_size``, other
            fields per detection.
        height, width: size of the image the boxes are wanted on.

    Returns:
        Instances of ``(height, width)`` with the same fields, boxes scaled.
    """
    scale_y, scale_x = height / result.image_size[0], width / result.image_size[1]
    legacy = result.pred_boxes.tensor
    boxes = legacy * legacy.new_tensor([scale_x, scale_y, scale_x, scale_y])
    boxes[:, 2:] += 1.0
    out = Instances((height, width), **result.get_fields())
    out.pred_boxes = Boxes(boxes)
    return out


def original_eval_boxes(instances: Instances) -> Instances:
    """``instances`` with the boxes the original's LVIS, Flickr30k and RefCOCO evaluations read:
    the legacy boxes scaled to the image, without the +1 that :func:`to_image_frame` (and the
    original's COCO evaluation) adds on x2 and y2."""
    boxes = instances.pred_boxes.tensor.clone()
    boxes[:, 2:] -= 1.0
    out = Instances(instances.image_size, **instances.get_fields())
    out.pred_boxes = Boxes(boxes)
    return out
