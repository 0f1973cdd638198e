"""RefCOCO / RefCOCO+ / RefCOCOg precision@k (FIBER fine-grained spec 5.2).

One record per referring expression, with exactly one ground-truth box. All predictions of the
record are sorted by score (their phrase label is not used, as in MDETR's evaluator); an
expression is correct at k when the largest generalized IoU (GIoU, not IoU) between one of the
first k boxes and the GT box is >= 0.5. Accuracy is Precision@1.

Ties are broken as the original (MDETR) evaluator does: predictions are sorted by the tuple
(score, x1, y1, x2, y2), larger first, so between equal scores the box with the larger coordinates
wins. Every record of the dataset must be evaluated exactly once (:mod:`.integrity`).
"""

import logging
from collections import OrderedDict

import torch
from detectron2.config import configurable
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.logger import create_small_table
from torchvision.ops import generalized_box_iou

from ..modeling.head.postprocess import original_eval_boxes
from .flickr import records_by_image_id
from .gather import gather_records
from .integrity import SeenRecords, without_predictions, write_metrics

__all__ = ["RefExpEvaluator", "refexp_gt_box", "topk_giou_hits"]

logger = logging.getLogger(__name__)


def refexp_gt_box(record: dict) -> torch.Tensor:
    """The single GT box of a referring-expression record.

    Args:
        record: dataset record with "phrases" whose "boxes" are absolute xyxy.

    Returns:
        (1, 4) float32 xyxy.
    """
    boxes = [box for phrase in record.get("phrases", []) for box in phrase.get("boxes", [])]
    if len(boxes) != 1:
        raise ValueError(
            f"refexp record {record.get('image_id')} must have exactly 1 GT box, has {len(boxes)}"
        )
    return torch.as_tensor(boxes, dtype=torch.float32).reshape(1, 4)


def topk_giou_hits(
    pred_boxes: torch.Tensor,
    scores: torch.Tensor,
    gt_box: torch.Tensor,
    topk: tuple[int, ...],
    threshold: float = 0.5,
) -> tuple[bool, ...]:
    """Whether any of the k best-scored boxes reaches the GIoU threshold, for each k.

    Predictions are ranked by (score, x1, y1, x2, y2), larger first: equal scores go to the box
    with the larger coordinates, as in the original evaluator.

    Args:
        pred_boxes: (N, 4) absolute xyxy.
        scores: (N,).
        gt_box: (1, 4) absolute xyxy.
        topk: the k values.
        threshold: minimum generalized IoU.

    Returns:
        one bool per k.
    """
    if len(pred_boxes) == 0:
        return tuple(False for _ in topk)
    keys = [(s, *b) for s, b in zip(scores.tolist(), pred_boxes.tolist())]
    ranked = sorted(range(len(keys)), key=keys.__getitem__, reverse=True)
    order = torch.as_tensor(ranked[: max(topk)], dtype=torch.long)
    giou = generalized_box_iou(pred_boxes[order].float(), gt_box.float()).flatten()
    return tuple(bool((giou[:k] >= threshold).any()) for k in topk)


class RefExpEvaluator(DatasetEvaluator):
    """Precision@k (percent) of referring-expression comprehension.

    ``evaluate()`` returns ``{"refexp": {"P@1", "P@5", "P@10"}}``.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        topk: tuple[int, ...] = (1, 5, 10),
        threshold: float = 0.5,
        distributed: bool = True,
        output_dir: str | None = None,
    ):
        """
        Args:
            dataset_name: registered dataset whose records hold the GT box ("phrases").
            topk: the k of Precision@k.
            threshold: GIoU needed for a correct expression.
            distributed: gather the per-record results of all ranks before reducing.
            output_dir: optional folder; the metrics are written to ``refexp_results.json``.
        """
        if not topk or min(topk) <= 0:
            raise ValueError(f"topk must be positive integers, got {topk}")
        self._dataset_name = dataset_name
        self._topk = tuple(int(k) for k in topk)
        self._threshold = threshold
        self._distributed = distributed
        self._output_dir = output_dir
        self._gt = None
        self._seen = SeenRecords(dataset_name, "RefExpEvaluator", distributed)
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: str | None = None) -> dict:
        return {"dataset_name": dataset_name, "output_dir": output_dir}

    def reset(self):
        self._results = {}  # image_id -> tuple of bools, one per k
        self._seen.reset()

    def process(self, inputs: list[dict], outputs: list[dict]):
        """
        Args:
            inputs: dicts with "image_id".
            outputs: dicts with "instances": ``pred_boxes`` (N, 4) absolute xyxy at the original
                image size and ``scores`` (N,).
        """
        if self._gt is None:
            self._gt = records_by_image_id(self._dataset_name)
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            self._seen.add(image_id)
            if image_id not in self._gt:
                continue  # reported by evaluate() (every rank raises there, none hangs)
            gt_box = refexp_gt_box(self._gt[image_id])
            # the original compares its legacy boxes scaled to the image (no +1 on x2, y2)
            instances = original_eval_boxes(without_predictions(inp, out)["instances"].to("cpu"))
            self._results[image_id] = topk_giou_hits(
                instances.pred_boxes.tensor, instances.scores, gt_box, self._topk, self._threshold
            )

    def evaluate(self) -> OrderedDict:
        """
        Returns:
            ``OrderedDict(refexp={"P@k": percent})`` on the main process, ``{}`` elsewhere.

        Raises:
            EvaluationCoverageError: a record of the dataset not evaluated exactly once.
        """
        if self._gt is None:
            self._gt = records_by_image_id(self._dataset_name)
        self._seen.check(list(self._gt))
        results = gather_records(self._results, self._distributed)
        if results is None:  # not the main process
            return OrderedDict()

        n = len(results)
        if n == 0:
            logger.warning("[RefExpEvaluator] no prediction was processed")
        metrics = {}
        for i, k in enumerate(self._topk):
            hits = sum(1 for flags in results.values() if flags[i])
            metrics[f"P@{k}"] = 100.0 * hits / n if n else float("nan")
        logger.info("Referring expressions (%d):\n%s", n, create_small_table(metrics))
        output = OrderedDict(refexp=metrics)
        return write_metrics(output, self._output_dir, "refexp_results.json")
