#!/usr/bin/env python
"""Image-captioning fine-tuning and evaluation with FIBER (same CLI as ``tools/train_net.py``):

    python projects/Captioning/train_net.py --config-file projects/Captioning/configs/shapes_mle.yaml \\
        [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

``CAPTION.STAGE`` picks the objective (mle / gold / cider); evaluation decodes every test image and
reports BLEU-4 and CIDEr (METEOR / SPICE when Java allows) with copypaste lines, writing
``OUTPUT_DIR/inference/<dataset>/caption.json``.
"""

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

from captioning import CaptionTrainer, load_captioning_config

from fiber_d2.engine.cli import launch_cli, run


def main(args):
    return run(
        args, CaptionTrainer, load=load_captioning_config, loggers=("fiber_d2", "captioning")
    )


if __name__ == "__main__":
    launch_cli(main, load=load_captioning_config)
