"""``NLVR2Trainer``: FIBERTrainer with the NLVR2 mapper and evaluator (each test set, e.g. dev and
test-P = ``nlvr2_test1``, is evaluated and logged separately)."""

from __future__ import annotations

from fiber_d2.engine.trainer import FIBERTrainer

from .evaluator import NLVR2Evaluator
from .mapper import NLVR2DatasetMapper

__all__ = ["NLVR2Trainer"]


class NLVR2Trainer(FIBERTrainer):
    """See the module docstring."""

    test_batch_size = 8

    @classmethod
    def build_mapper(cls, cfg, is_train: bool):
        return NLVR2DatasetMapper(cfg, is_train)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        return NLVR2Evaluator(dataset_name, cls.inference_folder(cfg, dataset_name, output_folder))
