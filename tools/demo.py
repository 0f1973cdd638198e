#!/usr/bin/env python
"""Ground a prompt in images with a FIBER detector; draw the boxes and/or write COCO json.

    python tools/demo.py --weights demo --input photos/ --prompt "red circle. blue square" \\
        --output out/ --json out/results.json [--batch-size 4] [--threshold 0.3] [--scale 2] \\
        [--device cuda] [--dtype bf16]
    python tools/demo.py --config-file configs/Demo/fine_tiny.yaml --input "imgs/*.png" a.jpg \\
        --caption "a red circle left of a blue square" --phrases "red circle" "blue square" \\
        --output out/ --opts MODEL.WEIGHTS output/demo/fine/model_final.pth

``--input`` takes folders (every image inside), globs and files. ``--weights`` takes a model-zoo name
(``fiber_d2.model_zoo``) or a local file of either layout (``--config-file`` then names its config; a
model-zoo name works there too); without it, ``--config-file`` (default: the Demo config) and its
``MODEL.WEIGHTS`` are used. Config paths are tried as given, then relative to the repository, so the
tool runs from any directory. ``--prompt`` lists category names joined by the config's separator (". ");
``--caption`` grounds ``--phrases`` (substrings; without them the whole caption is one phrase). Images
are run ``--batch-size`` at a time (one batched forward pass); an unreadable image is reported and
skipped. With ``--output`` one drawn image per input is written there (small images upscaled to at least
512 px unless ``--scale`` is given); ``--json`` writes COCO-format results with a ``label`` (text) and a
``file_name`` per box. A progress bar with ETA goes to stderr, one summary line per image to stdout.
"""

import argparse
import glob
import json
import logging
import os
import sys

try:
    # first: registers FIBER's components and quiets fvcore's import-time TorchScript warning
    import fiber_d2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the environment
    missing = e.name or "detectron2"
    sys.exit(
        f"error: {missing} is not importable ({e}); run this with the environment's python "
        "(.venv/bin/python, made by `make env`) or see README 'Troubleshooting the detectron2 install'."
    )
import numpy as np
import torch
from detectron2.utils.logger import setup_logger
from PIL import Image
from tqdm import tqdm

from fiber_d2.checkpoint.safe_io import write_whole
from fiber_d2.engine.cli import check_output_dir, check_output_file
from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.predictor import FIBERPredictor, resolve_dtype, split_prompt, to_coco_json
from fiber_d2.visualize import draw_grounding

logger = logging.getLogger("fiber_d2.demo")

DEFAULT_CONFIG = "configs/Demo/fine_tiny.yaml"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FIBER grounding demo: draw a prompt's boxes on images")
    p.add_argument("--config-file", default=None, metavar="FILE", help="config yaml or zoo name")
    p.add_argument("--weights", help="model-zoo name or weights file (either layout)")
    p.add_argument("--input", nargs="+", required=True, help="image files, folders or globs")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help='category names joined by the separator: "cat. dog"')
    text.add_argument("--caption", help="a caption whose --phrases are grounded")
    p.add_argument("--phrases", nargs="+", help="substrings of --caption, one label each")
    p.add_argument("--output", help="directory for the drawn images (one per input)")
    p.add_argument("--json", metavar="FILE", help="write COCO-format results with text labels")
    p.add_argument(
        "--threshold",
        "--confidence-threshold",
        dest="threshold",
        type=float,
        default=0.3,
        help="minimum score drawn / written (0-1)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (autocast)")
    p.add_argument("--scale", type=float, help="drawing size factor (default: upscale to 512 px)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return p


def expand_inputs(patterns: list) -> list:
    """Image paths: each pattern is a file, a folder (its images, sorted) or a glob."""
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            matches = sorted(
                os.path.join(pattern, n)
                for n in os.listdir(pattern)
                if n.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not matches:
                raise FileNotFoundError(f"--input folder {pattern!r} holds no image file")
        else:
            matches = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern))
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
        name, k = stem + ext, i
        while name in used:  # another input's name, or a suffixed one already given out
            name, k = f"{stem}_{k}{ext}", k + 1
        used.add(name)
        names.append(os.path.join(out_dir, name))
    return names


def build_predictor(args) -> FIBERPredictor:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU")
        device = "cpu"
    if args.weights:
        if "MODEL.WEIGHTS" in args.opts[::2]:
            raise ValueError("give the weights once: --weights or --opts MODEL.WEIGHTS, not both")
        return FIBERPredictor.from_pretrained(
            args.weights, config=args.config_file, device=device, dtype=args.dtype, opts=args.opts
        )
    cfg = load_config(args.config_file or DEFAULT_CONFIG, args.opts)
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    predictor = FIBERPredictor(cfg)
    predictor.dtype = resolve_dtype(args.dtype)
    return predictor


def _summary(path, inst, threshold, names) -> str:
    shown = inst[inst.scores >= threshold]
    best = ""
    if len(shown):
        top = int(shown.scores.argmax())
        best = f"; best: {names[int(shown.pred_classes[top])]!r} {float(shown.scores[top]):.2f}"
    return f"{path}: {len(shown)} of {len(inst)} detections >= {threshold}{best}"


def main(argv=None) -> list:
    """Run the demo; returns the written image paths (empty without ``--output``)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.phrases and args.caption is None:
        parser.error("--phrases needs --caption")
    try:
        if not 0.0 <= args.threshold <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.scale is not None and args.scale <= 0:
            raise ValueError(f"--scale must be positive, got {args.scale}")
        resolve_dtype(args.dtype)
        inputs = expand_inputs(args.input)
        predictor = build_predictor(args)
        if args.prompt is not None:
            prompt, phrases = split_prompt(args.prompt, predictor.separator), None
        else:
            prompt, phrases = args.caption, args.phrases
        predictor.encode(prompt, phrases)  # reject a bad prompt before reading any image
        # the output folders before any image is read: an unwritable one is one line, not a loss
        if args.output:
            check_output_dir(args.output, "--output")
        if args.json:
            check_output_file(args.json, "--json")
    except (ConfigError, ValueError, KeyError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"error: {message}")

    targets = output_paths(inputs, args.output) if args.output else [None] * len(inputs)
    written, skipped, records = [], [], []
    with tqdm(total=len(inputs), unit="img", desc="demo", file=sys.stderr) as bar:
        for start in range(0, len(inputs), args.batch_size):
            batch = []
            for index in range(start, min(start + args.batch_size, len(inputs))):
                path = inputs[index]
                try:
                    batch.append((index, predictor.read_image(path)))
                except (OSError, ValueError) as e:
                    skipped.append(path)
                    tqdm.write(f"skipped {path}: unreadable image ({e})", file=sys.stderr)
                    bar.update(1)
            if not batch:
                continue
            arrays = [array for _, array in batch]
            rgb_model = predictor.input_format == "RGB"
            outs = predictor(
                arrays,
                [prompt] * len(arrays),
                phrases=[phrases] * len(arrays),
                image_format=predictor.input_format,
            )
            for (index, array), out in zip(batch, outs):
                path, target = inputs[index], targets[index]
                inst = out["instances"].to("cpu")
                tqdm.write(_summary(path, inst, args.threshold, out["label_names"]))
                if args.json:
                    kept = dict(out, instances=inst[inst.scores >= args.threshold])
                    for r in to_coco_json(kept, index + 1):
                        records.append(dict(r, file_name=os.path.basename(path)))
                if target is not None:
                    rgb = np.ascontiguousarray(array if rgb_model else array[:, :, ::-1])
                    try:
                        drawn = draw_grounding(
                            rgb, inst, out["label_names"], args.threshold, scale=args.scale
                        )
                    except ValueError as e:  # e.g. --scale drawing it over MAX_DRAWN_SIDE
                        sys.exit(f"error: {path}: {e}")
                    Image.fromarray(drawn).save(target)
                    written.append(target)
                bar.update(1)
    if skipped and len(skipped) == len(inputs):  # before --json: no empty result file
        sys.exit(f"error: none of the {len(inputs)} input image(s) could be read: {skipped[0]}")
    if args.json:
        with write_whole(args.json, "w") as f:
            json.dump(records, f)
        print(f"wrote {len(records)} detection(s) to {args.json}")
    if args.output:
        print(f"wrote {len(written)} image(s) to {args.output}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped)}")
    return written


if __name__ == "__main__":
    # Only as a script, so that in-process callers (tests) keep their own logging set-up.
    setup_logger(name="fiber_d2", abbrev_name="fiber").setLevel(logging.INFO)
    main()
