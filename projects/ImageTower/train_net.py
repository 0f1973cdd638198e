#!/usr/bin/env python
"""Supervised pre-training of FIBER's Swin image tower (same CLI as ``tools/train_net.py``):

    python projects/ImageTower/train_net.py --config-file projects/ImageTower/configs/shapes.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

At the end of training the tower is written to ``OUTPUT_DIR/swin_weights.pth`` in the Swin ImageNet
layout, for ``MODEL.SWIN.WEIGHTS`` of any FIBER config with the same ``MODEL.SWIN`` sizes.
"""

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

from image_tower import ImageTowerTrainer, load_image_tower_config

from fiber_d2.engine.cli import launch_cli, run

Trainer = ImageTowerTrainer


def main(args):
    return run(args, Trainer, load=load_image_tower_config, loggers=("fiber_d2", "image_tower"))


if __name__ == "__main__":
    launch_cli(main, load=load_image_tower_config)
