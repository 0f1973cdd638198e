#!/usr/bin/env python
"""VQAv2 fine-tuning and evaluation with FIBER's coarse model (same CLI as ``tools/train_net.py``):

    python projects/VQA/train_net.py --config-file projects/VQA/configs/shapes.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

Training questions without an in-vocabulary answer are counted and dropped; evaluation writes
``vqa_submit.json`` per test set under ``OUTPUT_DIR/inference/<dataset>/``.
"""

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

from vqa import VQATrainer, load_vqa_config

from fiber_d2.engine.cli import launch_cli, run

Trainer = VQATrainer


def main(args):
    return run(args, Trainer, load=load_vqa_config, loggers=("fiber_d2", "vqa"))


if __name__ == "__main__":
    launch_cli(main, load=load_vqa_config)
