#!/usr/bin/env python
"""Analyse a FIBER model built from a config, offline and on the CPU.

    python tools/analyze_model.py --config-file configs/FIBER-B/coco.yaml --tasks parameter
    python tools/analyze_model.py --config-file configs/Demo/fine_tiny.yaml --tasks flop [--height H --width W]

``parameter`` prints a per-module parameter table and ends with ``total_parameters: N`` (all parameters,
frozen ones included, buffers excluded). ``flop`` counts FLOPs (fvcore) of one forward pass of backbone
and head on one image of the configured test size and a full-length text.
"""

import argparse
import logging
import sys

import torch

try:
    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger
except ImportError as e:  # pragma: no cover
    sys.exit(f"error: detectron2 is not importable ({e}); run `make test` or see README 'Install'.")
from fvcore.nn import FlopCountAnalysis, flop_count_table, parameter_count_table

import fiber_d2  # noqa: F401
from fiber_d2.engine.setup import ConfigError, load_config

logger = logging.getLogger("fiber_d2.analyze_model")


class _BackboneAndHead(torch.nn.Module):
    """Traceable view of a FIBER detector: (image, input_ids, mask) -> head outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image, input_ids, attention_mask):
        outputs, _ = self.model._run(image, input_ids, attention_mask)
        return tuple(t for v in outputs.values() for t in v)


def parameter_report(model: torch.nn.Module, max_depth: int) -> str:
    total = sum(p.numel() for p in model.parameters())
    table = parameter_count_table(model, max_depth=max_depth)
    return f"{table}\ntotal_parameters: {total}"


def flop_report(model, cfg, height: int, width: int) -> str:
    model.eval()
    t = cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    image = torch.zeros(1, 3, height, width)
    ids = torch.full((1, t), cfg.MODEL.LANGUAGE_BACKBONE.PAD_TOKEN_ID, dtype=torch.long)
    ids[0, 0], ids[0, -1] = 0, 2
    mask = torch.ones(1, t, dtype=torch.long)
    flops = FlopCountAnalysis(_BackboneAndHead(model), (image, ids, mask))
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return f"{flop_count_table(flops, max_depth=4)}\ntotal_flops: {flops.total()}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default="", metavar="FILE")
    parser.add_argument("--tasks", nargs="+", choices=["parameter", "flop"], default=["parameter"])
    parser.add_argument("--max-depth", type=int, default=3, help="depth of the parameter table")
    parser.add_argument("--height", type=int, default=None, help="flop input height (MIN_SIZE_TEST)")
    parser.add_argument("--width", type=int, default=None, help="flop input width (MAX_SIZE_TEST)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    setup_logger(name="fiber_d2")
    try:
        cfg = load_config(args.config_file, args.opts)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    model = build_model(cfg)
    for task in args.tasks:
        if task == "parameter":
            print(parameter_report(model, args.max_depth))
        else:
            h = args.height or cfg.INPUT.MIN_SIZE_TEST
            w = args.width or cfg.INPUT.MAX_SIZE_TEST
            div = cfg.INPUT.SIZE_DIVISIBILITY
            h, w = -(-h // div) * div, -(-w // div) * div
            print(flop_report(model, cfg, h, w))


if __name__ == "__main__":
    main()
