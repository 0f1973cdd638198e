#!/usr/bin/env python
"""NLVR2 fine-tuning and evaluation with FIBER's coarse model (same CLI as ``tools/train_net.py``):

    python projects/NLVR2/train_net.py --config-file projects/NLVR2/configs/shapes.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

Each test set (dev, test-P = ``nlvr2_test1``) is evaluated and logged separately.
"""

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

from nlvr2 import NLVR2Trainer

from fiber_d2.engine.cli import launch_cli, run

Trainer = NLVR2Trainer


def main(args):
    return run(args, Trainer, loggers=("fiber_d2", "nlvr2"))


if __name__ == "__main__":
    launch_cli(main)
