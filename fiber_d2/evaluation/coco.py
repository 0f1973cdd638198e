"""COCO-style box AP for fiber_d2's detection datasets: detectron2's ``COCOEvaluator`` plus the
bookkeeping of :mod:`.integrity` and the dataset loaders' box rule.

* Every record of the dataset is evaluated exactly once (else ``EvaluationCoverageError``).
* An input flagged ``"unreadable"`` (``TEST.UNREADABLE_IMAGE_AS_EMPTY``) counts with no predictions;
  its ground truth stays in the denominator.
* Ground-truth boxes that the dataset loaders drop (:func:`~fiber_d2.data.datasets.common.box_problem`:
  not finite, empty or outside the image) are dropped from the json's ground truth
  too, with one counted warning, so training and evaluation see the same boxes and an image with one
  bad box keeps its other boxes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import OrderedDict

from detectron2.evaluation import COCOEvaluator

from ..data.datasets.common import box_problem, check_unique_image_ids
from .integrity import SeenRecords, without_predictions

__all__ = ["FIBERCOCOEvaluator", "check_unique_image_ids", "drop_bad_gt_boxes"]

logger = logging.getLogger(__name__)


def drop_bad_gt_boxes(dataset: dict, images: dict, name: str) -> bool:
    """Remove from a COCO/LVIS-format ``dataset`` the ground-truth boxes the loaders drop
    (:func:`~fiber_d2.data.datasets.common.box_problem`), with one counted warning.

    Args:
        dataset: the json dict (its ``annotations`` list is replaced).
        images: image id -> image entry (``width``, ``height``, ``file_name``).
        name: the dataset name, for the warning.

    Returns:
        whether anything was dropped (the caller re-indexes its API object).
    """
    kept, dropped, files, orphans = [], 0, set(), []
    for a in dataset.get("annotations", []):
        if a.get("image_id") not in images:  # not scored: COCOeval reads the listed images only
            orphans.append(a.get("image_id"))
            kept.append(a)
            continue
        img = images[a["image_id"]]
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            problem = box_problem([x, y, x + w, y + h], img["width"], img["height"])
        except (KeyError, TypeError, ValueError) as e:
            problem = f"unusable bbox ({e!r})"
        if problem:
            dropped += 1
            files.add(img.get("file_name", img.get("coco_url", a.get("image_id"))))
            continue
        kept.append(a)
    if orphans:
        logger.warning(
            "%s: %d ground-truth box(es) name an image id that 'images' does not list (first: %r); "
            "the evaluation ignores them",
            name,
            len(orphans),
            orphans[0],
        )
    if not dropped:
        return False
    logger.warning(
        "%s: %d ground-truth box(es) dropped from the evaluation, as the loader drops them "
        "(not finite, empty or outside the image), in %d image(s): %s",
        name,
        dropped,
        len(files),
        ", ".join(sorted(map(str, files))[:5]),
    )
    dataset["annotations"] = kept
    return True


class FIBERCOCOEvaluator(COCOEvaluator):
    """detectron2's COCOEvaluator with exactly-once checking and the loaders' box rule."""

    def __init__(self, dataset_name: str, *args, distributed: bool = True, **kwargs):
        """
        Args:
            dataset_name, args, kwargs: as detectron2's ``COCOEvaluator``.
            distributed: gather the results of all ranks.
        """
        super().__init__(dataset_name, *args, distributed=distributed, **kwargs)
        self._seen = SeenRecords(dataset_name, "COCOEvaluator", distributed)
        if getattr(self, "_do_evaluation", False):
            source = self._metadata.get("json_file", "") or dataset_name
            check_unique_image_ids(self._coco_api.dataset.get("images", []), source)
            self._drop_bad_gt_boxes()

    def _drop_bad_gt_boxes(self) -> None:
        if drop_bad_gt_boxes(self._coco_api.dataset, self._coco_api.imgs, self._metadata.name):
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco_api.createIndex()

    def reset(self):
        super().reset()
        if hasattr(self, "_seen"):
            self._seen.reset()

    def process(self, inputs, outputs):
        outputs = [without_predictions(i, o) for i, o in zip(inputs, outputs)]
        for inp in inputs:
            self._seen.add(inp["image_id"])
        super().process(inputs, outputs)

    def evaluate(self, img_ids=None) -> OrderedDict:
        """detectron2's evaluation, after checking that every record was evaluated once.

        Raises:
            EvaluationCoverageError: a record of the dataset not evaluated exactly once.
        """
        self._seen.check()
        return super().evaluate(img_ids)
