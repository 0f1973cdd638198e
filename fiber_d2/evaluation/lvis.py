"""LVIS box evaluation with MDETR's "Fixed AP" protocol.

Fixed AP (FIBER fine-grained spec 4.3) keeps, per category, the ``topk`` highest-scoring detections
over the whole dataset and puts no cap on the number of detections per image; the usual LVIS bbox
AP is then computed on what is kept. At test time an image is run once per prompt chunk (40
category names each); the model pools the detections of all chunks into one ``Instances`` per
image, so this evaluator sees an ordinary detection output.

Everything else (gathering across ranks, the contiguous -> LVIS category-id mapping, the xyxy ->
xywh conversion without +1, the LVIS API call) is inherited from detectron2's ``LVISEvaluator``.
"""

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.evaluation import LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances

from ..modeling.head.postprocess import original_eval_boxes
from .coco import check_unique_image_ids, drop_bad_gt_boxes
from .integrity import SeenRecords, without_predictions

__all__ = ["FixedAPLVISEvaluator", "keep_topk_per_category"]

logger = logging.getLogger(__name__)

# Buffered detections (per rank) above which process() prunes to the per-category top-k, so that
# memory stays bounded by num_categories * topk instead of growing with the dataset.
PRUNE_EVERY = 2_000_000


class _NumpyWithFloat:
    """``numpy`` seen through an object that still has the ``np.float`` alias (removed in 1.24)."""

    float = float

    def __getattr__(self, name: str):
        return getattr(np, name)


@contextlib.contextmanager
def _lvis_numpy_compat() -> Iterator[None]:
    """Let ``lvis`` 0.5.3 run on NumPy >= 1.24.

    ``lvis.eval.LVISEval.accumulate`` casts with ``np.float``. Only the ``np`` name inside the
    ``lvis.eval`` module is swapped, and only for the duration of the block; numpy itself is not
    modified.
    """
    import lvis.eval as lvis_eval_module

    if hasattr(np, "float") or isinstance(lvis_eval_module.np, _NumpyWithFloat):
        yield
        return
    original = lvis_eval_module.np
    lvis_eval_module.np = _NumpyWithFloat()
    try:
        yield
    finally:
        lvis_eval_module.np = original


def _compact(instances: Instances) -> Instances:
    """Keep only the fields the box metric needs (on the CPU)."""
    instances = instances.to("cpu")
    return Instances(
        instances.image_size,
        pred_boxes=instances.pred_boxes,
        scores=instances.scores,
        pred_classes=instances.pred_classes,
    )


def keep_topk_per_category(predictions: list[dict], topk: int) -> list[dict]:
    """Keep, for every category, the ``topk`` highest-scoring detections over all images.

    There is no per-image limit. Among detections with equal scores the earlier one (in the order
    of ``predictions``, then of the detections inside an image) is kept first (tie order at the
    cut is UNDETERMINED in the spec; with several ranks it follows the gather order).

    Args:
        predictions: one dict per image, ``{"image_id": ..., "instances": Instances}`` with
            ``pred_boxes`` (N_i, 4), ``scores`` (N_i,) and ``pred_classes`` (N_i,).
        topk: detections kept per category (> 0).

    Returns:
        the same list structure (one entry per input image, possibly with empty ``Instances``).
    """
    if topk <= 0:
        raise ValueError(f"fixed_ap_topk must be > 0, got {topk}")
    if not predictions:
        return []
    scores = torch.cat([p["instances"].scores for p in predictions])
    classes = torch.cat([p["instances"].pred_classes for p in predictions]).long()
    if scores.numel() == 0:
        return predictions
    # Order by score (descending, stable), then group by class (stable): inside each class group
    # the detections are in descending score order, so the rank inside the group is the position
    # minus the position of the group's first element.
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(classes[order], stable=True).indices]
    sorted_classes = classes[order]
    _, counts = torch.unique_consecutive(sorted_classes, return_counts=True)
    group_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank_in_class = torch.arange(order.numel()) - group_start
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[rank_in_class < topk]] = True

    out, start = [], 0
    for p in predictions:
        n = len(p["instances"])
        out.append({**p, "instances": p["instances"][keep[start : start + n]]})
        start += n
    return out


class FixedAPLVISEvaluator(LVISEvaluator):
    """detectron2's ``LVISEvaluator`` with an optional Fixed-AP mode.

    With ``fixed_ap=False`` it behaves like the parent (per-image cap ``max_dets_per_image``,
    300 by default). With ``fixed_ap=True`` the per-image cap is removed (``max_dets=-1`` for
    ``lvis.LVISResults``) and only the ``fixed_ap_topk`` best detections of every category over
    the whole dataset are evaluated.

    Note: ``LVISEval.params.max_dets`` is left at its default; the lvis API only uses it to name
    the (unreported) ``AR@...`` keys, the cap itself is applied by ``LVISResults``.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        tasks: tuple[str, ...] | None = ("bbox",),
        distributed: bool = True,
        output_dir: str | None = None,
        max_dets_per_image: int | None = None,
        fixed_ap: bool = False,
        fixed_ap_topk: int = 10000,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` (LVIS format).
            tasks: evaluated tasks (only "bbox" is meaningful for FIBER).
            distributed: gather predictions from all ranks before evaluating.
            output_dir: optional folder for the raw predictions and the LVIS-format results.
            max_dets_per_image: per-image cap when ``fixed_ap`` is False (None: LVIS's 300).
            fixed_ap: use MDETR's Fixed AP protocol.
            fixed_ap_topk: detections kept per category with ``fixed_ap``.
        """
        if fixed_ap:
            if max_dets_per_image not in (None, -1):
                raise ValueError(
                    f"fixed_ap=True has no per-image cap, but max_dets_per_image={max_dets_per_image}"
                )
            if fixed_ap_topk <= 0:
                raise ValueError(f"fixed_ap_topk must be > 0, got {fixed_ap_topk}")
            max_dets_per_image = -1
        super().__init__(
            dataset_name,
            tasks=tasks,
            distributed=distributed,
            output_dir=output_dir,
            max_dets_per_image=max_dets_per_image,
        )
        self._fixed_ap = fixed_ap
        self._fixed_ap_topk = fixed_ap_topk
        self._num_buffered = 0
        self._seen = SeenRecords(dataset_name, "FixedAPLVISEvaluator", distributed)
        # the loaders' box rule, as in FIBERCOCOEvaluator: training and evaluation see the same boxes
        api = getattr(self, "_lvis_api", None)
        if api is not None:
            source = self._metadata.get("json_file", "") or dataset_name
            check_unique_image_ids(api.dataset.get("images", []), source)
        if api is not None and drop_bad_gt_boxes(api.dataset, api.imgs, dataset_name):
            api._create_index()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: str | None = None) -> dict:
        return {
            "dataset_name": dataset_name,
            "tasks": ("bbox",),
            "output_dir": output_dir,
            "fixed_ap": cfg.TEST.FIXED_AP,
            "fixed_ap_topk": cfg.TEST.FIXED_AP_TOPK,
        }

    def reset(self):
        super().reset()
        self._num_buffered = 0
        if hasattr(self, "_seen"):
            self._seen.reset()

    def process(self, inputs: list[dict], outputs: list[dict]):
        """Buffer the detections; with Fixed AP keep compact tensors and prune periodically.

        Args:
            inputs: dicts with at least "image_id".
            outputs: dicts with "instances" (``pred_boxes`` absolute xyxy at the original image
                size, ``scores``, ``pred_classes`` contiguous category ids).
        """
        # the original evaluates its legacy boxes scaled to the image (no +1 on x2, y2)
        outputs = [
            {**o, "instances": original_eval_boxes(o["instances"])} if "instances" in o else o
            for o in (without_predictions(i, o) for i, o in zip(inputs, outputs))
        ]
        for inp in inputs:
            self._seen.add(inp["image_id"])
        if not self._fixed_ap:
            super().process(inputs, outputs)
            return
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                raise KeyError(f"image {inp['image_id']}: model output has no 'instances'")
            instances = _compact(out["instances"])
            self._predictions.append({"image_id": inp["image_id"], "instances": instances})
            self._num_buffered += len(instances)
        if self._num_buffered > PRUNE_EVERY:
            self._predictions = keep_topk_per_category(self._predictions, self._fixed_ap_topk)
            self._num_buffered = sum(len(p["instances"]) for p in self._predictions)

    def evaluate(self):
        """detectron2's evaluation, after checking that every record was evaluated once.

        Raises:
            EvaluationCoverageError: a record of the dataset not evaluated exactly once.
        """
        self._seen.check()
        return super().evaluate()

    def _eval_predictions(self, predictions: list[dict]):
        if self._fixed_ap:
            predictions = keep_topk_per_category(predictions, self._fixed_ap_topk)
            logger.info(
                "Fixed AP: %d detections kept (top %d per category, no per-image cap)",
                sum(len(p["instances"]) for p in predictions),
                self._fixed_ap_topk,
            )
            predictions = [
                {**p, "instances": instances_to_coco_json(p["instances"], p["image_id"])}
                for p in predictions
            ]
        with _lvis_numpy_compat():
            super()._eval_predictions(predictions)
