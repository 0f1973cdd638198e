#!/usr/bin/env python
"""Image-text retrieval fine-tuning and evaluation with FIBER's coarse model (same CLI as
``tools/train_net.py``):

    python projects/Retrieval/train_net.py --config-file projects/Retrieval/configs/shapes_itc.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

``RETRIEVAL.MODE itc`` ranks every pair by ITC cosine; ``itm`` re-ranks each image's and each text's
top ``RETRIEVAL.RERANK_K`` ITC pairs with the ITM match logit. ``FIBERRetrievalITM`` trains with random
negatives (each sample carries a false image, :class:`retrieval.FalseImageCaptionMapper`).
"""

import logging
import os
import sys
from collections import OrderedDict

from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from retrieval import FalseImageCaptionMapper, ITMRerankRetrievalEvaluator, add_retrieval_config

import fiber_d2  # noqa: F401  (registers FIBER's components)
from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.config import add_fiber_config
from fiber_d2.data.mapper import CaptionDatasetMapper
from fiber_d2.engine.setup import ConfigError, validate_config
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
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        mapper = FalseImageCaptionMapper(cfg, True, dataset_dicts=dataset)
        return build_detection_train_loader(cfg, dataset=dataset, mapper=mapper)

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
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
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

    Args:
        config_file: yaml path (``_BASE_`` allowed) or None/"" for the defaults.
        opts: flat ``[KEY, VALUE, ...]`` overrides.

    Returns:
        the merged, unfrozen config.

    Raises:
        ConfigError: missing file, unknown key, malformed overrides (one line).
    """
    cfg = add_retrieval_config(add_fiber_config(get_cfg()))
    if config_file and not os.path.isfile(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
    for what, merge, arg in (
        (config_file, cfg.merge_from_file, config_file),
        ("command-line override", cfg.merge_from_list, opts),
    ):
        if not arg:
            continue
        try:
            merge(arg)
        except (KeyError, AssertionError, ValueError) as e:
            text = str(e.args[0] if e.args else e).replace("\n", " ")
            raise ConfigError(f"{what}: {text}") from None
    if cfg.RETRIEVAL.MODE not in ("itc", "itm"):
        raise ConfigError(f"RETRIEVAL.MODE must be 'itc' or 'itm', got {cfg.RETRIEVAL.MODE!r}")
    return cfg


def setup(args):
    cfg = load_retrieval_config(args.config_file, args.opts)
    validate_config(cfg, training=not args.eval_only)
    cfg.freeze()
    default_setup(cfg, args)
    for name in ("fiber_d2", "retrieval"):
        setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        FIBERCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    try:
        validate_config(
            load_retrieval_config(args.config_file, args.opts), training=not args.eval_only
        )
    except ConfigError as e:
        sys.exit(f"error: {e}")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
