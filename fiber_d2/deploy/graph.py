"""The exportable graph: a FIBER detector with its post-processing as one tensor-in, tensor-out module.

:class:`ExportableFIBER` wraps a :class:`~fiber_d2.modeling.meta_arch.fiber.FIBER` and computes,
from already normalised and padded images and a tokenised prompt, the detections that
``FIBER.inference`` computes (before the rescaling to the original image size, which stays on the
host, :func:`~fiber_d2.modeling.head.postprocess.to_image_frame`). The post-processing of
:func:`~fiber_d2.modeling.head.ground_inference` is rewritten batch-wise with fixed-shape tensor
ops, so that one ``torch.jit.trace`` serves every input size (TorchScript, ONNX):

* per-level candidates: ``score > threshold`` then top ``pre_nms_top_n`` becomes one ``topk`` over
  all (anchor, label) pairs with non-candidates ranked at -1, followed by a validity mask (the same
  set as ``nonzero`` + ``topk``);
* the class-aware NMS is the custom op ``fiber_d2::batched_nms`` (eager kernel:
  ``torchvision.ops.batched_nms``, so TorchScript runs exactly eager's NMS; ONNX:
  ``NonMaxSuppression`` with one score row per class, i.e. per-class NMS on the original
  coordinates, see :mod:`fiber_d2.deploy.onnx_ops`);
* the per-image ``kthvalue`` cut keeps every detection scoring at least the
  ``detections_per_img``-th best of its image, computed with a per-row ``topk``;
* ``min(pre_nms_top_n, candidates)`` and the like are ``torch.clamp`` of the traced size, so the
  top-k sizes follow the input instead of freezing the sample's.

Outputs are flat, image-major and sorted by decreasing score within an image.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms as _torchvision_batched_nms

from ..modeling.head.atss import LegacyBoxCoder
from ..modeling.meta_arch.fiber import FIBER

__all__ = ["ExportableFIBER", "batched_nms", "batched_postprocess", "label_scores_batched"]

logger = logging.getLogger(__name__)


@torch.library.custom_op("fiber_d2::batched_nms", mutates_args=())
def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware NMS (``torchvision.ops.batched_nms``) as one opaque op for export.

    Args:
        boxes: (M, 4) xyxy boxes.
        scores: (M,) scores.
        idxs: (M,) int64 group of each box; boxes of different groups never suppress each other.
        iou_threshold: boxes overlapping a better box of their group by IoU > this are dropped.

    Returns:
        (K,) int64 indices of the kept boxes (any order: the callers sort).
    """
    return _torchvision_batched_nms(boxes, scores, idxs, iou_threshold)


@batched_nms.register_fake
def _batched_nms_fake(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.long)


def _size_min(a: int, b):
    """``min(a, b)`` of a constant and a size. Under ``torch.jit.trace`` sizes are traced 0-d
    tensors and ``torch.clamp`` keeps the result traced (``min`` would freeze the sample's value).
    """
    if isinstance(b, Tensor):
        return torch.clamp(b, max=a)
    return min(a, b)


def label_scores_batched(probs: Tensor, member: Tensor, score_agg: str = "MEAN") -> Tensor:
    """Batched :func:`~fiber_d2.modeling.head.postprocess.label_scores`.

    Args:
        probs: (B, A, T) token probabilities.
        member: (B, L, T) bool, the tokens of each label.
        score_agg: "MEAN" or "MAX".

    Returns:
        (B, A, L) label scores; a label without tokens scores 0.
    """
    if score_agg == "MEAN":
        counts = member.sum(dim=2).to(probs.dtype)[:, None, :]
        sums = torch.matmul(probs, member.to(probs.dtype).transpose(1, 2))
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    if score_agg == "MAX":
        # probabilities are positive, so a 0 fill gives the masked max (and 0 without tokens)
        masked = torch.where(member[:, None, :, :], probs[:, :, None, :], 0.0)
        return masked.amax(dim=3)
    raise ValueError(f"unknown score_agg '{score_agg}', expected MEAN or MAX")


def batched_postprocess(
    anchors: list[Tensor],
    head_outputs: dict[str, list[Tensor]],
    label_token_map: Tensor,
    image_sizes: Tensor,
    text_mask: Tensor,
    *,
    score_threshold: float,
    pre_nms_top_n: int,
    nms_threshold: float,
    detections_per_img: int,
    score_agg: str,
    box_coder: LegacyBoxCoder | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`~fiber_d2.modeling.head.ground_inference` for a whole batch, with traceable ops.

    Args:
        anchors: per level (A_l, 4), shared by the batch.
        head_outputs: ``GroundingHead`` outputs (see ``ground_inference``).
        label_token_map: (B, L, T) bool tokens of each label (padded labels: all False).
        image_sizes: (B, 2) int64 (h, w) of the resized, un-padded images.
        text_mask: (B, T) real-token mask.
        score_threshold, pre_nms_top_n, nms_threshold, detections_per_img, score_agg: as
            ``ground_inference``.
        box_coder: box coder (default weights (10, 10, 5, 5)).

    Returns:
        (batch_index (K,) int64, boxes (K, 4) legacy xyxy in the resized frame, scores (K,),
        labels (K,) int64), image-major, decreasing score within an image.
    """
    box_coder = box_coder or LegacyBoxCoder()
    member = (label_token_map > 0) & (text_mask > 0)[:, None, :]
    num_images, num_labels = member.shape[0], member.shape[1]
    sizes = image_sizes.to(torch.float32)
    max_x = (sizes[:, 1] - 1)[:, None]
    max_y = (sizes[:, 0] - 1)[:, None]
    all_boxes, all_scores, all_labels, all_valid = [], [], [], []
    for level, level_anchors in enumerate(anchors):
        logits = head_outputs["token_logits"][level].float()  # (B, A, T)
        scores = label_scores_batched(logits.sigmoid(), member, score_agg)  # (B, A, L)
        ctr = head_outputs["centerness"][level].float().flatten(1).sigmoid()  # (B, A)
        candidates = scores > score_threshold
        ranked = torch.where(candidates, scores * ctr[:, :, None], -1.0).flatten(1)
        k = _size_min(pre_nms_top_n, ranked.shape[1])
        ranked, top = ranked.topk(k, dim=1)  # (B, k), sorted
        valid = candidates.flatten(1).gather(1, top)
        loc = torch.div(top, num_labels, rounding_mode="floor")
        labels = top - loc * num_labels
        deltas = head_outputs["box_regression"][level].float().permute(0, 2, 3, 1).flatten(1, 2)
        deltas = deltas.gather(1, loc[:, :, None].expand(-1, -1, 4))
        boxes = box_coder.decode(deltas.reshape(-1, 4), level_anchors[loc].reshape(-1, 4).float())
        boxes = boxes.reshape(num_images, -1, 4)
        x = torch.minimum(boxes[:, :, 0::2].clamp(min=0), max_x[:, :, None])
        y = torch.minimum(boxes[:, :, 1::2].clamp(min=0), max_y[:, :, None])
        boxes = torch.stack([x[:, :, 0], y[:, :, 0], x[:, :, 1], y[:, :, 1]], dim=2)
        all_boxes.append(boxes)
        all_scores.append(torch.sqrt(ranked.clamp(min=0)))
        all_labels.append(labels)
        all_valid.append(valid)
    boxes = torch.cat(all_boxes, dim=1)  # (B, N, 4)
    scores = torch.cat(all_scores, dim=1)  # (B, N)
    labels = torch.cat(all_labels, dim=1)
    valid = torch.cat(all_valid, dim=1)
    num = scores.shape[1]
    image_index = torch.arange(num_images, device=scores.device)[:, None].expand(-1, num)

    # class-aware NMS on the valid candidates; one group per (image, label)
    flat = valid.flatten().nonzero()[:, 0]
    flat_boxes = boxes.reshape(-1, 4)[flat]
    flat_scores = scores.flatten()[flat]
    groups = (image_index * num_labels + labels).flatten()[flat]
    plus = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
    keep = flat[batched_nms(flat_boxes + plus, flat_scores, groups, nms_threshold)]
    kept = torch.zeros(num_images * num, dtype=torch.bool, device=scores.device)
    kept = kept.scatter(0, keep, torch.ones_like(keep, dtype=torch.bool)).reshape(num_images, num)
    kept_scores = torch.where(kept, scores, -1.0)

    # per image: every detection scoring at least the detections_per_img-th best (ties kept)
    kept_scores, order = kept_scores.topk(num, dim=1)  # a full sort (ONNX has no stable sort)
    if detections_per_img > 0:
        cut_index = _size_min(detections_per_img, num) - 1
        cut = kept_scores[:, cut_index : cut_index + 1].clamp(min=0)
        final = kept_scores.ge(cut) & kept_scores.ge(0)
    else:
        final = kept_scores.ge(0)
    boxes = boxes.gather(1, order[:, :, None].expand(-1, -1, 4))
    labels = labels.gather(1, order)
    rows, cols = final.nonzero(as_tuple=True)
    return rows, boxes[rows, cols], kept_scores[rows, cols], labels[rows, cols]


class ExportableFIBER(nn.Module):
    """A FIBER detector as one tensor function (backbone, head, anchors, post-processing).

    Preprocessing (resize, normalise with ``pixel_mean`` / ``pixel_std``, zero-pad to the size
    divisibility) and tokenisation stay on the host, as does the final rescaling of the boxes to
    the original image size (see :mod:`fiber_d2.deploy.runtime`).
    """

    def __init__(self, model: FIBER):
        """
        Args:
            model: the detector (its post-processing settings are copied into the graph).
        """
        super().__init__()
        if not isinstance(model, FIBER):
            raise ValueError(
                f"only the fine-grained detector FIBER can be exported, got {type(model).__name__}"
            )
        self.model = model.eval()

    def forward(
        self,
        images: Tensor,
        image_sizes: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        label_token_map: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        Args:
            images: (B, 3, H, W) float32, normalised and zero-padded; H, W multiples of the
                backbone's size divisibility.
            image_sizes: (B, 2) int64 (h, w) of the un-padded images.
            input_ids: (B, T) int64 token ids.
            attention_mask: (B, T) int64, 1 for real tokens.
            label_token_map: (B, L, T) bool, the tokens of each label (pad rows: all False).

        Returns:
            ``batch_index`` (K,) int64, ``boxes`` (K, 4) float32 (legacy "+1" xyxy in the resized
            frame, as ``FIBER._detect``), ``scores`` (K,) float32, ``labels`` (K,) int64 (row of the
            label map); image-major, decreasing score within an image.
        """
        model = self.model
        outputs, anchors = model._run(images, input_ids, attention_mask)
        return batched_postprocess(
            anchors,
            outputs,
            label_token_map,
            image_sizes,
            attention_mask,
            score_threshold=model.score_threshold,
            pre_nms_top_n=model.pre_nms_top_n,
            nms_threshold=model.nms_threshold,
            detections_per_img=model.detections_per_img,
            score_agg=model.score_agg,
        )
