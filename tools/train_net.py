#!/usr/bin/env python
"""Train or evaluate a FIBER model (either stage) with detectron2.

    python tools/train_net.py --config-file configs/Demo/fine_tiny.yaml [--num-gpus N] [--resume]
        [--eval-only] [KEY VALUE ...]

Multi-GPU / multi-node runs go through detectron2's ``launch`` (torch.distributed DDP); on a CPU-only
machine ``--num-gpus 2 MODEL.DEVICE cpu`` runs two gloo processes.
"""

import json
import logging
import os
import sys

try:
    from detectron2.engine import default_argument_parser, default_setup, launch
    from detectron2.evaluation import verify_results
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger
except ImportError as e:  # pragma: no cover - exercised only without detectron2
    sys.exit(f"error: detectron2 is not importable ({e}); run `make test` or see README 'Install'.")

import fiber_d2  # noqa: F401  (registers FIBER's components)
from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.engine.setup import ConfigError, load_config, validate_config
from fiber_d2.engine.trainer import FIBERTrainer

logger = logging.getLogger("fiber_d2.train_net")


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    validate_config(cfg, training=not args.eval_only)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="fiber_d2")
    return cfg


def save_results(cfg, results) -> None:
    """Write the final evaluation results to OUTPUT_DIR/results.json (main process)."""
    if comm.is_main_process() and results:
        with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
            json.dump(results, f, indent=2)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = FIBERTrainer.build_model(cfg)
        FIBERCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = FIBERTrainer.test(cfg, model)
        verify_results(cfg, res)
    else:
        trainer = FIBERTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        res = getattr(trainer, "_last_eval_results", None)  # set by the final evaluation
    save_results(cfg, res)
    return res


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    try:
        # Fail fast on config mistakes in the launching process, before spawning workers.
        validate_config(load_config(args.config_file, args.opts), training=not args.eval_only)
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
