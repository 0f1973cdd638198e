#!/usr/bin/env python
"""Train or evaluate a FIBER model (either stage) with detectron2.

    python tools/train_net.py --config-file configs/Demo/fine_tiny.yaml [--num-gpus N] [--resume]
        [--eval-only] [KEY VALUE ...]

Multi-GPU / multi-node runs go through detectron2's ``launch`` (torch.distributed DDP); on a CPU-only
machine ``--num-gpus 2 MODEL.DEVICE cpu`` runs two gloo processes. The final evaluation results are
also written to ``OUTPUT_DIR/results.json``.
"""

import sys

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without detectron2
    sys.exit(
        f"error: detectron2 is not importable ({e}); run `make test` or see README 'Troubleshooting the detectron2 install'."
    )

import fiber_d2  # noqa: F401  (registers FIBER's components)
from fiber_d2.engine.cli import launch_cli, run
from fiber_d2.engine.trainer import FIBERTrainer


def main(args):
    return run(args, FIBERTrainer)


if __name__ == "__main__":
    launch_cli(main)
