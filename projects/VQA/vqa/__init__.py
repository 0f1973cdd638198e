"""VQAv2 with FIBER's coarse model: the ``FIBERVQA`` head on the fused ``cls_feats``, the official answer
normalisation and accuracy, and the VQAv2 / shapes datasets. Importing registers the model and datasets.
"""

from .answers import (
    answer_score,
    answer_scores,
    build_answer_vocab,
    normalize_answer,
    vocab_from_labels,
    vqa_accuracy,
)
from .config import add_vqa_config
from .datasets import load_shapes_vqa, load_vqa_arrow, load_vqa_json, register_all_vqa
from .evaluator import VQAEvaluator
from .mapper import VQADatasetMapper, soft_target
from .modeling import FIBERVQA, vqa_loss
from .trainer import VQATrainer, load_vqa_config
from .vocab import answer_vocab, drop_unanswerable

__all__ = [
    "FIBERVQA",
    "VQADatasetMapper",
    "VQAEvaluator",
    "VQATrainer",
    "add_vqa_config",
    "answer_score",
    "answer_scores",
    "answer_vocab",
    "build_answer_vocab",
    "drop_unanswerable",
    "load_shapes_vqa",
    "load_vqa_arrow",
    "load_vqa_config",
    "load_vqa_json",
    "normalize_answer",
    "register_all_vqa",
    "soft_target",
    "vocab_from_labels",
    "vqa_accuracy",
    "vqa_loss",
]

register_all_vqa()
