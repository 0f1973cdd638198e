"""Evaluators: COCO box AP, LVIS chunked / Fixed AP, Flickr30k recall, RefCOCO accuracy, retrieval
recall."""

from .build import EVALUATOR_BUILDERS, build_evaluator
from .coco import FIBERCOCOEvaluator
from .flickr import FlickrRecallEvaluator
from .integrity import EvaluationCoverageError, json_safe
from .lvis import FixedAPLVISEvaluator, keep_topk_per_category
from .refexp import RefExpEvaluator
from .retrieval import RetrievalEvaluator, retrieval_recall

__all__ = [
    "EVALUATOR_BUILDERS",
    "EvaluationCoverageError",
    "FIBERCOCOEvaluator",
    "FixedAPLVISEvaluator",
    "FlickrRecallEvaluator",
    "RefExpEvaluator",
    "RetrievalEvaluator",
    "build_evaluator",
    "json_safe",
    "keep_topk_per_category",
    "retrieval_recall",
]
