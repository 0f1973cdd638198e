"""What a predictor does with the model's detections: score threshold, class-agnostic NMS and
top-k selection, and COCO result records carrying each box's text label.

Used by :class:`fiber_d2.predictor.FIBERPredictor` (and so the exported runners) and
``tools/demo.py``.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from torchvision.ops import nms

__all__ = ["check_threshold", "check_selection", "select_detections", "nms_keep", "to_coco_json"]


def check_threshold(threshold: Optional[float]) -> None:
    """Raise ValueError (one line) unless ``threshold`` is None or a number in [0, 1]."""
    if threshold is not None and not (
        isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0
    ):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")


def check_selection(
    threshold: Optional[float],
    class_agnostic_nms: Union[bool, float],
    max_detections: Optional[int],
) -> None:
    """Validate the options of :func:`select_detections` (one-line ValueError)."""
    check_threshold(threshold)
    if max_detections is not None and (not isinstance(max_detections, int) or max_detections < 1):
        raise ValueError(f"max_detections must be a positive int, got {max_detections!r}")
    if isinstance(class_agnostic_nms, float) and not 0.0 < class_agnostic_nms <= 1.0:
        raise ValueError(f"class_agnostic_nms IoU must be in (0, 1], got {class_agnostic_nms}")


def select_detections(
    inst: Instances,
    *,
    threshold: Optional[float],
    nms: Union[bool, float, None],
    top: Optional[int],
    nms_threshold: float,
) -> Instances:
    """float32 fields, score order, then threshold / class-agnostic NMS / top-k.

    Args:
        inst: N detections with ``pred_boxes``, ``scores`` and ``pred_classes`` (its box and
            score tensors are converted to float32 in place).
        threshold: keep scores >= this; None: all.
        nms: True: class-agnostic NMS at ``nms_threshold``; a float: NMS at that IoU;
            False / None: none.
        top: keep at most this many (highest scores); None: all.
        nms_threshold: the IoU of ``nms=True`` (the model's ``ATSS.NMS_TH``).

    Returns:
        the kept detections, sorted by decreasing score.
    """
    inst.pred_boxes.tensor = inst.pred_boxes.tensor.float()
    inst.scores = inst.scores.float()
    inst = inst[inst.scores.argsort(descending=True)]
    if threshold is not None:
        inst = inst[inst.scores >= threshold]
    if nms is not False and nms is not None and len(inst):
        iou = nms_threshold if nms is True else float(nms)
        inst = inst[nms_keep(inst.pred_boxes.tensor, inst.scores, iou)]
    if top is not None:
        inst = inst[:top]
    return inst


def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by class-agnostic NMS (torchvision), in decreasing score order."""
    return nms(boxes.float(), scores.float(), iou)


def to_coco_json(
    results: Union[dict, Iterable[dict]],
    image_ids: Union[int, Sequence[int]],
    category_ids: Optional[Sequence[int]] = None,
) -> List[dict]:
    """COCO detection results (``loadRes`` format) with the text label of every box.

    Args:
        results: one :class:`FIBERPredictor` output, or a list of them.
        image_ids: the image id of each result (one int for one result).
        category_ids: COCO category id of each label (``label_names`` order); None: label index
            + 1 (the order of the prompt's names).

    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "label"}``
        (detectron2's ``instances_to_coco_json`` records plus ``label``).

    Raises:
        ValueError: as many image ids as results are needed.
    """
    if isinstance(results, dict):
        results = [results]
    results = list(results)
    if isinstance(image_ids, (int, np.integer)):
        image_ids = [int(image_ids)]
    if len(image_ids) != len(results):
        raise ValueError(
            f"{len(results)} results need {len(results)} image ids, got {len(image_ids)}"
        )
    out = []
    for result, image_id in zip(results, image_ids):
        names = result["label_names"]
        # detectron2's conversion (xywh boxes, category_id = the class index), then ids and labels
        for r in instances_to_coco_json(result["instances"].to("cpu"), int(image_id)):
            label = r["category_id"]
            r["category_id"] = int(category_ids[label]) if category_ids else label + 1
            r["label"] = names[label]
            out.append(r)
    return out
