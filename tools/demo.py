#!/usr/bin/env python
"""Ground a prompt in images with a FIBER detector and draw the boxes.

    python tools/demo.py --config-file configs/Demo/fine_tiny.yaml --input imgs/*.png \\
        --prompt "red circle. blue square" --output out/ [--confidence-threshold 0.3] \\
        [--opts MODEL.WEIGHTS output/demo/fine/model_final.pth]
    python tools/demo.py ... --caption "a red circle left of a blue square" \\
        --phrases "red circle" "blue square"

``--prompt`` lists category names joined by the config's separator (". "); ``--caption`` grounds
``--phrases`` (substrings of the caption; without them the whole caption is one phrase). With
``--output`` one drawn image per input is written there; otherwise a summary line per image is
printed. Runs on the CPU when no GPU is available.
"""

import argparse
import glob
import logging
import os
import sys
import time

try:
    import numpy as np
    import torch
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.logger import setup_logger
    from PIL import Image
except ImportError as e:  # pragma: no cover - exercised only without the environment
    sys.exit(f"error: detectron2 is not importable ({e}); run `make test` or see README 'Install'.")

import fiber_d2  # noqa: F401  (registers FIBER's components)
from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.predictor import FIBERPredictor, split_prompt
from fiber_d2.visualize import draw_grounding

logger = logging.getLogger("fiber_d2.demo")

DEFAULT_CONFIG = "configs/Demo/fine_tiny.yaml"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FIBER grounding demo: draw a prompt's boxes on images")
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="config yaml")
    p.add_argument("--input", nargs="+", required=True, help="image paths or glob patterns")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help='category names joined by the separator: "cat. dog"')
    text.add_argument("--caption", help="a caption whose --phrases are grounded")
    p.add_argument("--phrases", nargs="+", help="substrings of --caption, one label each")
    p.add_argument("--output", help="directory for the drawn images (one per input)")
    p.add_argument("--confidence-threshold", type=float, default=0.3, help="minimum drawn score")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return p


def expand_inputs(patterns: list) -> list:
    """Paths of the inputs: each pattern is a file or a glob matching at least one file."""
    paths = []
    for pattern in patterns:
        matches = (
            [pattern] if os.path.isfile(pattern) else sorted(glob.glob(os.path.expanduser(pattern)))
        )
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no image file")
        paths.extend(m for m in matches if m not in paths)
    return paths


def output_paths(inputs: list, out_dir: str) -> list:
    """One output file per input: its base name, made unique when two inputs share it."""
    names, used = [], set()
    for i, path in enumerate(inputs):
        stem, ext = os.path.splitext(os.path.basename(path))
        ext = ext if ext.lower() in (".png", ".jpg", ".jpeg", ".bmp") else ".png"
        name = stem + ext
        if name in used:
            name = f"{stem}_{i}{ext}"
        used.add(name)
        names.append(os.path.join(out_dir, name))
    return names


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def main(argv=None) -> list:
    """Run the demo; returns the written image paths (empty without ``--output``)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.phrases and args.caption is None:
        parser.error("--phrases needs --caption")
    try:
        inputs = expand_inputs(args.input)
        cfg = setup_cfg(args)
        if args.prompt is not None:
            prompt, phrases = split_prompt(args.prompt, cfg.DATASETS.SEPARATION_TOKENS), None
        else:
            prompt, phrases = args.caption, args.phrases
        predictor = FIBERPredictor(cfg)
        predictor.encode(prompt, phrases)  # reject a bad prompt before reading any image
    except (ConfigError, ValueError, KeyError, OSError) as e:
        sys.exit(f"error: {e}")

    targets = output_paths(inputs, args.output) if args.output else [None] * len(inputs)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
    written = []
    for path, target in zip(inputs, targets):
        try:
            image = read_image(path, format="BGR")
        except (OSError, ValueError) as e:
            sys.exit(f"error: cannot read image {path}: {e}")
        start = time.perf_counter()
        out = predictor(image, prompt, phrases=phrases)
        seconds = time.perf_counter() - start
        inst = out["instances"].to("cpu")
        shown = inst[inst.scores >= args.confidence_threshold]
        best = ""
        if len(shown):
            top = int(shown.scores.argmax())
            name = out["label_names"][int(shown.pred_classes[top])]
            best = f"; best: {name!r} {float(shown.scores[top]):.2f}"
        print(
            f"{path}: {len(shown)} of {len(inst)} detections >= {args.confidence_threshold} "
            f"in {seconds:.2f}s{best}"
        )
        if target is not None:
            rgb = np.ascontiguousarray(image[:, :, ::-1])
            drawn = draw_grounding(rgb, inst, out["label_names"], args.confidence_threshold)
            Image.fromarray(drawn).save(target)
            written.append(target)
    if args.output:
        print(f"wrote {len(written)} image(s) to {args.output}")
    return written


if __name__ == "__main__":
    # Only as a script, so that in-process callers (tests) keep their own logging set-up.
    setup_logger(name="fiber_d2", abbrev_name="fiber").setLevel(logging.INFO)
    main()
