"""``build_evaluator``: the evaluator of a registered dataset, chosen by its ``evaluator_type``."""

import logging
from collections.abc import Callable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from .coco import FIBERCOCOEvaluator
from .flickr import FlickrRecallEvaluator
from .lvis import FixedAPLVISEvaluator
from .refexp import RefExpEvaluator
from .retrieval import RetrievalEvaluator

__all__ = ["EVALUATOR_BUILDERS", "build_evaluator"]

logger = logging.getLogger(__name__)


def _build_coco(cfg, dataset_name: str, output_folder: str | None) -> DatasetEvaluator:
    # detectron2's evaluator (pycocotools COCOeval when the compiled fast COCOeval is missing),
    # with the exactly-once check and the loaders' box rule.
    return FIBERCOCOEvaluator(dataset_name, output_dir=output_folder, tasks=("bbox",))


def _build_configurable(evaluator_cls) -> Callable:
    def build(cfg, dataset_name: str, output_folder: str | None) -> DatasetEvaluator:
        return evaluator_cls(cfg, dataset_name, output_dir=output_folder)

    return build


# evaluator_type (MetadataCatalog) -> builder(cfg, dataset_name, output_folder). Projects may add
# entries for their own dataset types.
EVALUATOR_BUILDERS: dict[str, Callable] = {
    "coco": _build_coco,
    "lvis": _build_configurable(FixedAPLVISEvaluator),
    "flickr": _build_configurable(FlickrRecallEvaluator),
    "refexp": _build_configurable(RefExpEvaluator),
    "retrieval": _build_configurable(RetrievalEvaluator),
}


def build_evaluator(cfg, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
    """Build the evaluator of a registered dataset.

    Args:
        cfg: a config with fiber_d2's keys (``add_fiber_config``).
        dataset_name: a name registered in ``DatasetCatalog`` whose metadata has
            ``evaluator_type`` in ``EVALUATOR_BUILDERS`` ("coco", "lvis", "flickr", "refexp",
            "retrieval").
        output_folder: optional folder for result files.

    Returns:
        the evaluator.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset '{dataset_name}' is not registered in DatasetCatalog")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type is None:
        raise KeyError(f"dataset '{dataset_name}' has no evaluator_type in MetadataCatalog")
    if evaluator_type not in EVALUATOR_BUILDERS:
        raise ValueError(
            f"dataset '{dataset_name}': unknown evaluator_type '{evaluator_type}'"
            f" (known: {', '.join(sorted(EVALUATOR_BUILDERS))})"
        )
    logger.info("Evaluator for '%s': %s", dataset_name, evaluator_type)
    return EVALUATOR_BUILDERS[evaluator_type](cfg, dataset_name, output_folder)
