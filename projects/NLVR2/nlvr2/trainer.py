"""``NLVR2Trainer``: FIBERTrainer with the NLVR2 mapper and evaluator (each test set, e.g. dev and
test-P = ``nlvr2_test1``, is evaluated and logged separately)."""

from __future__ import annotations

import os

from detectron2.data import build_detection_test_loader, build_detection_train_loader

from fiber_d2.engine.trainer import FIBERTrainer

from .evaluator import NLVR2Evaluator
from .mapper import NLVR2DatasetMapper

__all__ = ["NLVR2Trainer"]


class NLVR2Trainer(FIBERTrainer):
    """See the module docstring."""

    @classmethod
    def build_mapper(cls, cfg, is_train: bool):
        return NLVR2DatasetMapper(cfg, is_train)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=cls.build_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=cls.build_mapper(cfg, False), batch_size=8
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return NLVR2Evaluator(dataset_name, output_folder)
