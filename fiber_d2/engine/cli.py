"""The shared body of the training entry points (``tools/train_net.py`` and the projects' ``train_net.py``).

Each entry point only names its trainer class and, when it adds config keys, its config loader:

    def main(args):
        return run(args, FIBERTrainer)

    if __name__ == "__main__":
        launch_cli(main)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import FIBERCheckpointer
from .setup import ConfigError, load_config, validate_config

__all__ = ["setup_cfg", "run", "launch_cli"]

ConfigLoader = Callable[[str, list], CfgNode]


def setup_cfg(args, *, load: ConfigLoader = load_config, loggers: Sequence[str] = ("fiber_d2",)):
    """Load, validate and freeze the config of ``args``; detectron2's ``default_setup`` plus the
    named loggers writing to ``OUTPUT_DIR``."""
    cfg = load(args.config_file, args.opts)
    validate_config(cfg, training=not args.eval_only)
    cfg.freeze()
    default_setup(cfg, args)
    for name in loggers:
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    return cfg


def run(
    args,
    trainer_cls,
    *,
    load: ConfigLoader = load_config,
    loggers: Sequence[str] = ("fiber_d2",),
) -> dict | None:
    """Evaluate (``--eval-only``) or train (``--resume`` continues from ``OUTPUT_DIR``).

    Returns the final evaluation results, which the main process also writes to
    ``OUTPUT_DIR/results.json``.
    """
    cfg = setup_cfg(args, load=load, loggers=loggers)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        FIBERCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = trainer_cls.test(cfg, model)
        verify_results(cfg, results)
    else:
        trainer = trainer_cls(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None)  # set by the final evaluation
    if comm.is_main_process() and results:
        with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def launch_cli(main: Callable, *, load: ConfigLoader = load_config) -> None:
    """Parse detectron2's standard arguments, reject a bad config with one ``error:`` line before
    any worker starts, then ``launch`` ``main(args)`` on ``--num-gpus`` processes."""
    args = default_argument_parser().parse_args()
    try:
        validate_config(load(args.config_file, args.opts), training=not args.eval_only)
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
