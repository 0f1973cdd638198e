#!/usr/bin/env python
"""VQAv2 fine-tuning and evaluation with FIBER's coarse model (same CLI as ``tools/train_net.py``):

    python projects/VQA/train_net.py --config-file projects/VQA/configs/shapes.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

Training questions without an in-vocabulary answer are counted and dropped; evaluation writes
``vqa_submit.json`` per test set under ``OUTPUT_DIR/inference/<dataset>/``.
"""

import logging
import os

from detectron2.config import CfgNode
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from vqa import VQADatasetMapper, VQAEvaluator, add_vqa_config, answer_vocab, drop_unanswerable

import fiber_d2  # noqa: F401  (registers FIBER's components)
from fiber_d2.engine.cli import launch_cli, run
from fiber_d2.engine.setup import load_config
from fiber_d2.engine.trainer import FIBERTrainer

logger = logging.getLogger("fiber_d2.vqa.train_net")


class Trainer(FIBERTrainer):
    """FIBERTrainer with the VQA mapper, the unanswerable-question filter and the VQA evaluator."""

    @classmethod
    def build_mapper(cls, cfg, is_train: bool):
        return VQADatasetMapper(cfg, is_train, answers=answer_vocab(cfg))

    @classmethod
    def build_train_loader(cls, cfg):
        records = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        records = drop_unanswerable(records, answer_vocab(cfg))
        return build_detection_train_loader(
            cfg, dataset=records, mapper=cls.build_mapper(cfg, True)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=cls.build_mapper(cfg, False), batch_size=8
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return VQAEvaluator(dataset_name, answer_vocab(cfg), output_folder)


def load_vqa_config(config_file: str | None, opts: list | None = None) -> CfgNode:
    """fiber_d2's and the project's defaults, a yaml file and ``KEY VALUE`` overrides.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides.
    """
    return load_config(config_file, opts, extra_defaults=(add_vqa_config,))


def main(args):
    return run(args, Trainer, load=load_vqa_config, loggers=("fiber_d2", "vqa"))


if __name__ == "__main__":
    launch_cli(main, load=load_vqa_config)
