#!/usr/bin/env python
"""Image-captioning fine-tuning and evaluation with FIBER (same CLI as ``tools/train_net.py``):

    python projects/Captioning/train_net.py --config-file projects/Captioning/configs/shapes_mle.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

``CAPTION.STAGE`` picks the objective (mle / gold / cider); evaluation decodes every test image and
reports BLEU-4 and CIDEr (METEOR / SPICE when Java allows) with copypaste lines, writing
``OUTPUT_DIR/inference/<dataset>/caption.json``.
"""

import logging
import os
from collections import OrderedDict

from captioning import (
    CaptionEvaluator,
    add_captioning_config,
    build_caption_mapper,
    caption_train_records,
)
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader

import fiber_d2  # noqa: F401  (registers FIBER's components)
from fiber_d2.engine.cli import launch_cli, run
from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.engine.trainer import FIBERTrainer

logger = logging.getLogger("fiber_d2.captioning.train_net")


class Trainer(FIBERTrainer):
    """FIBERTrainer with the caption mapper, reference-carrying training records and the caption
    evaluator."""

    @classmethod
    def build_mapper(cls, cfg, is_train: bool):
        return build_caption_mapper(cfg, is_train)

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = cls.build_mapper(cfg, True)
        return build_detection_train_loader(cfg, dataset=caption_train_records(cfg), mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return CaptionEvaluator(dataset_name, output_folder, cfg.CAPTION.METRICS)

    def train(self):
        """Train; returns the last evaluation's results."""
        super().train()
        return getattr(self, "_last_eval_results", OrderedDict())


def load_captioning_config(config_file: str | None, opts: list | None = None) -> CfgNode:
    """fiber_d2's and the project's defaults, a yaml file and ``KEY VALUE`` overrides.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides, unknown stage or decoding.
    """
    cfg = load_config(config_file, opts, extra_defaults=(add_captioning_config,))
    if cfg.CAPTION.STAGE not in ("mle", "gold", "cider"):
        raise ConfigError(f"CAPTION.STAGE must be mle, gold or cider, got {cfg.CAPTION.STAGE!r}")
    if cfg.CAPTION.DECODING not in ("beam", "greedy"):
        raise ConfigError(f"CAPTION.DECODING must be beam or greedy, got {cfg.CAPTION.DECODING!r}")
    return cfg


def main(args):
    return run(args, Trainer, load=load_captioning_config, loggers=("fiber_d2", "captioning"))


if __name__ == "__main__":
    launch_cli(main, load=load_captioning_config)
