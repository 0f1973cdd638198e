#!/usr/bin/env python
"""NLVR2 fine-tuning and evaluation with FIBER's coarse model (same CLI as ``tools/train_net.py``):

    python projects/NLVR2/train_net.py --config-file projects/NLVR2/configs/shapes.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

Each test set (dev, test-P = ``nlvr2_test1``) is evaluated and logged separately.
"""

import logging
import os

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from nlvr2 import NLVR2DatasetMapper, NLVR2Evaluator

import fiber_d2  # noqa: F401  (registers FIBER's components)
from fiber_d2.engine.cli import launch_cli, run
from fiber_d2.engine.trainer import FIBERTrainer

logger = logging.getLogger("fiber_d2.nlvr2.train_net")


class Trainer(FIBERTrainer):
    """FIBERTrainer with the NLVR2 mapper and evaluator."""

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


def main(args):
    return run(args, Trainer, loggers=("fiber_d2", "nlvr2"))


if __name__ == "__main__":
    launch_cli(main)
