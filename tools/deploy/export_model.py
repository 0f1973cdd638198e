#!/usr/bin/env python
"""Export a FIBER detector for deployment (ONNX or TorchScript).

    python tools/deploy/export_model.py --config-file configs/Demo/fine_tiny.yaml --format onnx \\
        --sample-image img.png --prompt "red circle. blue square" --output output/export_onnx \\
        --opts MODEL.WEIGHTS output/demo/fine/model_final.pth
    python tools/deploy/export_model.py ... --format torchscript --caption "a red circle" \\
        --phrases "red circle"

The sample image and prompt only trace the graph: the export accepts any image whose padded sides
lie in [--min-side, --max-side] (default: 3 x SIZE_DIVISIBILITY .. MAX_SIZE_TEST), any text length up
to MAX_QUERY_LEN and a batch up to --max-batch (both formats). Without --sample-image a random
image of the test size is used. Run the export with ``fiber_d2.deploy.ONNXPredictor(DIR)`` /
``TorchScriptPredictor(DIR)``, called like ``FIBERPredictor``. ``--verify`` then runs eager and the
export on two other image sizes and two other prompt lengths and prints one JSON line per pair
(``fiber_d2.deploy.verify``); a mismatch exits with status 1.
"""

import argparse
import contextlib
import json
import logging
import os
import sys

try:
    import numpy as np
    from detectron2.utils.logger import setup_logger
except ImportError as e:  # pragma: no cover - exercised only without the environment
    sys.exit(
        f"error: detectron2 is not importable ({e}); run `make test` or see README 'Troubleshooting the detectron2 install'."
    )

import fiber_d2  # noqa: F401  (registers FIBER's components)
from fiber_d2.deploy.export import FORMATS, check_exportable, export_detector
from fiber_d2.engine.cli import check_output_dir
from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.predictor import FIBERPredictor, split_prompt
from fiber_d2.text import padded_text_length

logger = logging.getLogger("fiber_d2.export")

VERIFY_PROMPTS = ["circle", "red circle. blue square. green triangle. yellow star. purple hexagon"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a FIBER detector (ONNX / TorchScript)")
    p.add_argument("--config-file", required=True, metavar="FILE", help="config yaml")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="export format")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--sample-image", help="image used to trace (default: random, test size)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", help='category names joined by the separator: "cat. dog"')
    text.add_argument("--caption", help="a caption whose --phrases are grounded")
    p.add_argument("--phrases", nargs="+", help="substrings of --caption, one label each")
    p.add_argument("--min-side", type=int, help="smallest padded image side of the export")
    p.add_argument("--max-side", type=int, help="largest padded image side of the export")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the export")
    p.add_argument(
        "--verify",
        action="store_true",
        help="after exporting, compare the export with eager on two image sizes and two prompts "
        "(--verify-prompts) other than the sample's; one JSON line each, exit 1 on a mismatch",
    )
    p.add_argument(
        "--verify-prompts",
        nargs=2,
        default=VERIFY_PROMPTS,
        metavar="PROMPT",
        help="the two prompts of --verify",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return p


def sample_record(predictor: FIBERPredictor, args: argparse.Namespace, seed: int = 0) -> dict:
    """The tracing input: the predictor's preprocessing of the sample image and prompt."""
    if args.sample_image:
        image = args.sample_image
    else:
        size = (predictor.aug.short_edge_length[0], predictor.aug.max_size)
        image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    if args.caption:
        text = predictor.encode(args.caption, args.phrases)
    else:
        prompt = "object" if args.prompt is None else args.prompt
        text = predictor.encode(split_prompt(prompt, predictor.separator))
    if text["input_ids"].dim() != 1:
        raise ValueError("the sample prompt needs several chunks; export with a shorter --prompt")
    record = predictor.preprocess_image(image)
    record.update({k: text[k] for k in ("input_ids", "attention_mask", "label_token_map")})
    return record


def main(argv=None) -> str:
    args = get_parser().parse_args(argv)
    created = not os.path.exists(args.output)
    try:
        if args.phrases and not args.caption:
            raise ValueError("--phrases needs --caption")
        cfg = load_config(args.config_file, args.opts)
        check_exportable(cfg, args.format)
        check_output_dir(args.output, "--output")
        # Export on the CPU: the deformable convolution traces as grid_sample + einsum there (the
        # CUDA path calls torchvision's kernel), and device constants in the graph stay on the CPU.
        cfg.MODEL.DEVICE = "cpu"
        predictor = FIBERPredictor(cfg)
        record = sample_record(predictor, args)
        path = export_detector(
            cfg,
            predictor.model,
            args.format,
            args.output,
            [record],
            min_side=args.min_side,
            max_side=args.max_side,
            max_batch=args.max_batch,
        )
        if args.verify:
            ok = verify(predictor, args, path.parent, record)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        if created:  # the folder this run made, unless something was written in it
            with contextlib.suppress(OSError):
                os.rmdir(args.output)
        sys.exit(f"error: {e}")
    print(os.fspath(path))
    if args.verify and not ok:
        sys.exit(f"error: the {args.format} export differs from eager (see the JSON lines above)")
    return os.fspath(path)


def verify(predictor: FIBERPredictor, args: argparse.Namespace, export_dir, record: dict) -> bool:
    """``--verify``: eager vs the export on two random images whose resized, padded sizes differ
    from the sample's and from each other (the first two of: the test size upright, lying, a square,
    and between those) and the two --verify-prompts."""
    from fiber_d2.deploy import ONNXPredictor, TorchScriptPredictor
    from fiber_d2.deploy.verify import verify_export

    runner = {"onnx": ONNXPredictor, "torchscript": TorchScriptPredictor}[args.format](export_dir)
    sample = {
        "padded_size": list(_padded_size(record, predictor)),
        "text_len": padded_text_length(
            record["attention_mask"], predictor.model.pad_to_max_query_len
        ),
    }
    short, long = predictor.aug.short_edge_length[0], predictor.aug.max_size
    middle = (short + long) // 2
    shapes, seen = [], [sample["padded_size"]]
    for h, w in [(long, short), (short, long), (short, short), (middle, short), (short, middle)]:
        padded = list(
            _padded_size(predictor.preprocess_image(np.zeros((h, w, 3), np.uint8)), predictor)
        )
        if padded not in seen and len(shapes) < 2:
            shapes.append((h, w))
            seen.append(padded)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    results = verify_export(predictor, runner, images, list(args.verify_prompts))
    for result in results:
        result["unseen_size"] = result["padded_size"] != sample["padded_size"]
        result["unseen_text_len"] = result["text_len"] != sample["text_len"]
        print(json.dumps({"verify": args.format, "sample": sample, **result}))
    return all(r["ok"] for r in results)


def _padded_size(record: dict, predictor: FIBERPredictor) -> tuple[int, int]:
    """Padded (H, W) of a record's image."""
    div = max(predictor.model.backbone.size_divisibility, 1)
    return tuple(-(-int(n) // div) * div for n in record["image"].shape[-2:])


if __name__ == "__main__":
    # Only as a script, so that in-process callers (tests) keep their own logging set-up; INFO: the
    # tracer's warnings (hundreds of lines) go to the debug log
    setup_logger(name="fiber_d2").setLevel(logging.INFO)
    main(sys.argv[1:])
