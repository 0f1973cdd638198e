"""NLVR2 with FIBER's coarse model: two fused passes per example and the pair classifier, the NLVR2 /
shapes datasets and the accuracy evaluator. Importing registers the model and datasets."""

from .datasets import load_nlvr2_arrow, load_nlvr2_json, load_shapes_nlvr2, register_all_nlvr2
from .evaluator import NLVR2Evaluator
from .mapper import NLVR2DatasetMapper
from .modeling import FIBERNLVR2, nlvr2_loss
from .trainer import NLVR2Trainer

__all__ = [
    "FIBERNLVR2",
    "NLVR2DatasetMapper",
    "NLVR2Evaluator",
    "NLVR2Trainer",
    "load_nlvr2_arrow",
    "load_nlvr2_json",
    "load_shapes_nlvr2",
    "nlvr2_loss",
    "register_all_nlvr2",
]

register_all_nlvr2()
