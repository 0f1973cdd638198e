"""Flickr30k Entities phrase-grounding recall (FIBER fine-grained spec 5.1).

Per sentence the predictions are sorted by score and routed to phrases by their label
(``pred_classes`` = 0-based phrase index); a dummy box [0, 0, 0, 0] is appended to every phrase's
list. A phrase is a hit at k when one of its first k boxes has IoU >= 0.5 (no +1) with ANY of its
ground-truth boxes ("separate" GT mode) or with the box enclosing all of them ("merged" mode).
Recall@{1, 5, 10} and the "upper bound" (all boxes) are reported overall and per phrase type;
phrases without boxes are skipped. Per-type keys name the type: ``R@1-clothing``. Every record of
the dataset must be evaluated exactly once (:mod:`.integrity`).
"""

import logging
from collections import OrderedDict, defaultdict

import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.logger import create_small_table
from torchvision.ops import box_iou

from ..modeling.head.postprocess import original_eval_boxes
from .gather import gather_records
from .integrity import SeenRecords, without_predictions, write_metrics

__all__ = ["FlickrRecallEvaluator", "phrase_hit_rank", "records_by_image_id"]

logger = logging.getLogger(__name__)

_GT_TYPES = ("separate", "merged")


def records_by_image_id(dataset_name: str) -> dict:
    """Index the records of a registered dataset by their (unique) ``image_id``.

    Args:
        dataset_name: a name registered in ``DatasetCatalog``.

    Returns:
        ``{image_id: record}``.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset '{dataset_name}' is not registered in DatasetCatalog")
    index = {}
    for record in DatasetCatalog.get(dataset_name):
        if "image_id" not in record:
            raise KeyError(f"dataset '{dataset_name}': a record has no 'image_id'")
        if record["image_id"] in index:
            raise ValueError(f"dataset '{dataset_name}': duplicate image_id {record['image_id']}")
        index[record["image_id"]] = record
    return index


def phrase_hit_rank(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, iou_threshold: float) -> int:
    """Position of the first predicted box that matches any GT box.

    Args:
        pred_boxes: (P, 4) absolute xyxy, already in descending score order (dummy box included).
        gt_boxes: (G, 4) absolute xyxy, G >= 1.
        iou_threshold: minimum IoU (no +1 in widths) for a match.

    Returns:
        the 0-based position of the first match, or -1 if no box matches.
    """
    if len(pred_boxes) == 0:
        return -1
    best = box_iou(pred_boxes.float(), gt_boxes.float()).amax(dim=1)
    hits = torch.nonzero(best >= iou_threshold).flatten()
    return int(hits[0]) if len(hits) else -1


def _phrase_types(phrase: dict) -> list[str]:
    """The phrase's type name(s): Flickr30k Entities phrases may carry several."""
    types = phrase.get("phrase_type", [])
    if isinstance(types, str):
        types = [types]
    out = []
    for t in types:  # nested lists (e.g. ["clothing"] per phrase) give their names, not a repr
        out.extend(_phrase_types({"phrase_type": t}) if isinstance(t, (list, tuple)) else [str(t)])
    return out


class FlickrRecallEvaluator(DatasetEvaluator):
    """Recall@k of phrase grounding, in percent.

    ``evaluate()`` returns ``{"grounding": {"R@1", "R@5", "R@10", "upper_bound"}}`` plus
    per-phrase-type entries named ``"R@1-<type>"`` ... ``"upper_bound-<type>"`` (the "-" keeps
    them out of the copypaste lines, as for detectron2's per-category AP).
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        *,
        gt_type: str = "separate",
        topk: tuple[int, ...] = (1, 5, 10),
        iou_threshold: float = 0.5,
        distributed: bool = True,
        output_dir: str | None = None,
    ):
        """
        Args:
            dataset_name: registered dataset whose records hold the ground truth ("phrases").
            gt_type: "separate" (hit with any GT box) or "merged" (enclosing box of the phrase).
            topk: the k of Recall@k.
            iou_threshold: IoU needed for a hit.
            distributed: gather the per-phrase results of all ranks before reducing.
            output_dir: optional folder; the metrics are written to ``flickr_results.json``.
        """
        if gt_type not in _GT_TYPES:
            raise ValueError(f"gt_type must be one of {_GT_TYPES}, got '{gt_type}'")
        if not topk or min(topk) <= 0:
            raise ValueError(f"topk must be positive integers, got {topk}")
        self._dataset_name = dataset_name
        self._gt_type = gt_type
        self._topk = tuple(int(k) for k in topk)
        self._iou_threshold = iou_threshold
        self._distributed = distributed
        self._output_dir = output_dir
        self._gt = None
        self._seen = SeenRecords(dataset_name, "FlickrRecallEvaluator", distributed)
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: str | None = None) -> dict:
        return {
            "dataset_name": dataset_name,
            "gt_type": cfg.TEST.FLICKR_GT_TYPE,
            "output_dir": output_dir,
        }

    def reset(self):
        # image_id -> list of (phrase types, rank of first hit or -1), one per phrase with boxes
        self._results = {}
        self._seen.reset()

    def _record(self, image_id) -> dict | None:
        """The dataset record, or None for an id not in the dataset (reported by evaluate())."""
        if self._gt is None:
            self._gt = records_by_image_id(self._dataset_name)
        return self._gt.get(image_id)

    def process(self, inputs: list[dict], outputs: list[dict]):
        """Score every phrase of every sentence of the batch.

        Args:
            inputs: dicts with "image_id".
            outputs: dicts with "instances": ``pred_boxes`` (N, 4) absolute xyxy at the original
                image size, ``scores`` (N,), ``pred_classes`` (N,) 0-based phrase indices.
        """
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            self._seen.add(image_id)
            record = self._record(image_id)
            if record is None:
                continue
            phrases = record.get("phrases", [])
            # the original compares its legacy boxes scaled to the image (no +1 on x2, y2)
            instances = original_eval_boxes(without_predictions(inp, out)["instances"].to("cpu"))
            # Tie order is UNDETERMINED in the spec; equal scores keep their input order.
            order = torch.sort(instances.scores, descending=True, stable=True).indices
            boxes = instances.pred_boxes.tensor[order].float()
            labels = instances.pred_classes[order]
            dummy = boxes.new_zeros((1, 4))
            per_phrase = []
            for index, phrase in enumerate(phrases):
                gt = torch.as_tensor(phrase.get("boxes", []), dtype=torch.float32).reshape(-1, 4)
                if len(gt) == 0:
                    continue
                if self._gt_type == "merged":
                    gt = torch.cat([gt[:, :2].amin(0), gt[:, 2:].amax(0)]).reshape(1, 4)
                candidates = torch.cat([boxes[labels == index], dummy])
                rank = phrase_hit_rank(candidates, gt, self._iou_threshold)
                per_phrase.append((_phrase_types(phrase), rank))
            self._results[image_id] = per_phrase

    def evaluate(self) -> OrderedDict:
        """
        Returns:
            ``OrderedDict(grounding={metric: percent})`` on the main process, ``{}`` elsewhere.

        Raises:
            EvaluationCoverageError: a record of the dataset not evaluated exactly once.
        """
        if self._gt is None:
            self._gt = records_by_image_id(self._dataset_name)
        self._seen.check(list(self._gt))
        results = gather_records(self._results, self._distributed)
        if results is None:  # not the main process
            return OrderedDict()

        ranks = [rank for per_phrase in results.values() for _, rank in per_phrase]
        by_type = defaultdict(list)
        for per_phrase in results.values():
            for types, rank in per_phrase:
                for phrase_type in types:
                    by_type[phrase_type].append(rank)
        if not ranks:
            logger.warning("[FlickrRecallEvaluator] no phrase with ground-truth boxes was seen")

        metrics = self._recalls(ranks, suffix="")
        for phrase_type in sorted(by_type):
            metrics.update(self._recalls(by_type[phrase_type], suffix=f"-{phrase_type}"))
        logger.info(
            "Flickr30k grounding recall (%s GT, %d phrases):\n%s",
            self._gt_type,
            len(ranks),
            create_small_table(metrics),
        )
        output = OrderedDict(grounding=metrics)
        return write_metrics(output, self._output_dir, "flickr_results.json")

    def _recalls(self, ranks: list[int], suffix: str) -> dict:
        """Recall@k and upper bound (percent) from first-hit ranks (-1 = never hit)."""
        n = len(ranks)
        out = {}
        for k in self._topk:
            hits = sum(1 for r in ranks if 0 <= r < k)
            out[f"R@{k}{suffix}"] = 100.0 * hits / n if n else float("nan")
        hits = sum(1 for r in ranks if r >= 0)
        out[f"upper_bound{suffix}"] = 100.0 * hits / n if n else float("nan")
        return out
