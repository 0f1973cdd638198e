#!/usr/bin/env python
"""Image-text retrieval fine-tuning and evaluation with FIBER's coarse model (same CLI as
``tools/train_net.py``):

    python projects/Retrieval/train_net.py --config-file projects/Retrieval/configs/shapes_itc.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

``RETRIEVAL.MODE itc`` ranks every pair by ITC cosine; ``itm`` re-ranks each image's and each text's
top ``RETRIEVAL.RERANK_K`` ITC pairs with the ITM match logit. ``FIBERRetrievalITM`` trains with random
negatives (each sample carries a false image, :class:`retrieval.FalseImageCaptionMapper`).
"""

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

import logging
from collections import OrderedDict

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from retrieval import FalseImageCaptionMapper, ITMRerankRetrievalEvaluator, add_retrieval_config

from fiber_d2.data.caption_mapper import CaptionDatasetMapper
from fiber_d2.engine.cli import launch_cli, run
from fiber_d2.engine.setup import ConfigError, load_config, require_at_least_one
from fiber_d2.engine.trainer import FIBERTrainer

logger = logging.getLogger("fiber_d2.retrieval.train_net")

ITM_META_ARCH = "FIBERRetrievalITM"


class Trainer(FIBERTrainer):
    """FIBERTrainer with the coarse mapper for every retrieval model, the false-image mapper for
    random-negative ITM training and the ITM re-ranking evaluator."""

    @classmethod
    def build_mapper(cls, cfg, is_train: bool):
        return CaptionDatasetMapper(cfg, is_train)

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.MODEL.META_ARCHITECTURE != ITM_META_ARCH:
            return super().build_train_loader(cfg)
        dataset = cls.train_records(cfg)
        mapper = FalseImageCaptionMapper(cfg, True, dataset_dicts=dataset)
        return super().build_train_loader(cfg, dataset=dataset, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None, model=None):
        """``RETRIEVAL.MODE`` "itc": fiber_d2's evaluator; "itm": ITC then ITM re-ranking (needs the
        model, which :meth:`test` passes)."""
        if cfg.RETRIEVAL.MODE == "itc":
            return super().build_evaluator(cfg, dataset_name, output_folder)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type != "retrieval":
            raise ValueError(
                f"RETRIEVAL.MODE itm evaluates retrieval datasets; '{dataset_name}' has"
                f" evaluator_type {evaluator_type!r}"
            )
        if model is None:
            raise ValueError("RETRIEVAL.MODE itm: the evaluator needs the model (see Trainer.test)")
        output_folder = cls.inference_folder(cfg, dataset_name, output_folder)
        return ITMRerankRetrievalEvaluator(cfg, dataset_name, output_folder, model=model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        if evaluators is None and cfg.RETRIEVAL.MODE == "itm":
            evaluators = [cls.build_evaluator(cfg, n, model=model) for n in cfg.DATASETS.TEST]
        return super().test(cfg, model, evaluators)

    def train(self):
        """Train; returns the last evaluation's results (detectron2 returns them only when
        ``TEST.EXPECTED_RESULTS`` is set)."""
        super().train()
        return getattr(self, "_last_eval_results", OrderedDict())


def load_retrieval_config(config_file: str | None, opts: list | None = None) -> CfgNode:
    """fiber_d2's and the project's defaults, a yaml file and ``KEY VALUE`` overrides.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides, unknown ``RETRIEVAL.MODE``.
    """
    cfg = load_config(config_file, opts, extra_defaults=(add_retrieval_config,))
    if cfg.RETRIEVAL.MODE not in ("itc", "itm"):
        raise ConfigError(f"RETRIEVAL.MODE must be 'itc' or 'itm', got {cfg.RETRIEVAL.MODE!r}")
    require_at_least_one(cfg, "RETRIEVAL.RERANK_K", "RETRIEVAL.ITM_BATCH")
    return cfg


def main(args):
    return run(args, Trainer, load=load_retrieval_config, loggers=("fiber_d2", "retrieval"))


if __name__ == "__main__":
    launch_cli(main, load=load_retrieval_config)
