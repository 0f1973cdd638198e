"""Image-text retrieval with FIBER's coarse model: ITC / random-negative ITM fine-tuning, ITC-then-ITM
evaluation. Importing registers ``FIBERRetrievalITM`` and the Flickr30k Karpathy caption splits."""

from .config import add_retrieval_config
from .datasets import register_f30k_karpathy
from .evaluator import ITMRerankRetrievalEvaluator
from .itm import FIBERRetrievalITM, random_negative_labels
from .mapper import FalseImageCaptionMapper
from .rerank import ITMPairScorer, stable_topk, topk_rerank

__all__ = [
    "FIBERRetrievalITM",
    "FalseImageCaptionMapper",
    "ITMPairScorer",
    "ITMRerankRetrievalEvaluator",
    "add_retrieval_config",
    "random_negative_labels",
    "register_f30k_karpathy",
    "stable_topk",
    "topk_rerank",
]

register_f30k_karpathy()
