#!/usr/bin/env python
"""Analyse a FIBER model built from a config, offline and on the CPU.

    python tools/analyze_model.py --config-file configs/FIBER-B/coco.yaml --tasks parameter
    python tools/analyze_model.py --config-file configs/Demo/fine_tiny.yaml --tasks flop \\
        [--height H --width W]

``parameter`` prints a per-module parameter table and ends with ``total_parameters: N`` (all
parameters, frozen ones included, buffers excluded). With ``--meta`` (the default when ``parameter``
is the only task) the model is built on PyTorch's meta device: shapes only, no memory, no
initialisation, so FIBER-B's 252M parameters are counted in well under a second.

``flop`` counts, with fvcore, the multiply-adds ("flops" in fvcore's sense: one fused multiply-add
is one flop) of one forward pass on one image and one full-length text (``MAX_QUERY_LEN`` tokens):

* ``FIBER``: backbone, FPN and head, image size ``MIN_SIZE_TEST`` x ``MAX_SIZE_TEST`` padded to
  ``SIZE_DIVISIBILITY`` (no anchors or post-processing);
* ``FIBERCoarse``: the fused image-text forward and the ITM head (the pair-scoring path), image
  ``INPUT.IMAGE_SIZE`` square.

``--height``/``--width`` override the image size. fvcore's ``matmul`` counter is replaced by one
that handles broadcasting and vectors, and scaled-dot-product attention is counted (QK^T and AV).
The table ends with ``total_flops: N``.

The towers' pretrained weights (``MODEL.LANGUAGE_BACKBONE.WEIGHTS``, ``MODEL.SWIN.WEIGHTS``) are
never loaded: counts do not depend on them and nothing is downloaded. A bad config (missing file,
unknown key) ends with one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import fiber_d2  # noqa: F401  # isort: skip  (imported first: registers FIBER, quiets fvcore)

import argparse
import logging
import math
import sys
from typing import Any

import torch

try:
    from detectron2.modeling import META_ARCH_REGISTRY, build_model
    from detectron2.utils.logger import setup_logger
except ImportError as e:  # pragma: no cover
    sys.exit(
        f"error: detectron2 is not importable ({e}); run `make test` or see README 'Troubleshooting the detectron2 install'."
    )
from fvcore.nn import FlopCountAnalysis, flop_count_table, parameter_count_table
from fvcore.nn.jit_handles import get_shape

from fiber_d2.checkpoint.safe_io import one_line
from fiber_d2.engine.setup import ConfigError, is_out_of_memory, load_config, tool_image_size
from fiber_d2.engine.trainer import is_coarse_stage

__all__ = ["build_analysis_model", "flop_report", "main", "parameter_report"]

logger = logging.getLogger("fiber_d2.analyze_model")


class _DetectorView(torch.nn.Module):
    """Traceable view of a ``FIBER`` detector: (image, input_ids, mask) -> head output tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, input_ids, attention_mask):
        outputs, _ = self.model._run(image, input_ids, attention_mask)
        return tuple(t for v in outputs.values() for t in v)


class _CoarseView(torch.nn.Module):
    """Traceable view of ``FIBERCoarse``: (image, input_ids, mask) -> ITM logits (B, 2)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, input_ids, attention_mask):
        return self.model.itm_logits(image, input_ids, attention_mask)


def _matmul_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of ``torch.matmul`` with broadcasting and 1-D operands: out elements x K."""
    a, b = get_shape(inputs[0]), get_shape(inputs[1])
    out = get_shape(outputs[0])
    k = a[-1]
    if len(b) >= 2 and b[-2] != k:
        raise ValueError(f"matmul with mismatched inner dimensions: {a} @ {b}")
    return math.prod(out) * k


def _sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of scaled dot-product attention.

    q (..., L, E), k (..., S, E), v (..., S, Ev): L x S x E for QK^T plus L x S x Ev for AV.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(torch.broadcast_shapes(tuple(q[:-2]), tuple(k[:-2])))
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def build_analysis_model(cfg, meta: bool) -> torch.nn.Module:
    """Build the configured meta-architecture, on the meta device or on the CPU.

    Args:
        cfg: a frozen config (``MODEL.DEVICE`` is ignored on the meta device).
        meta: build on ``torch.device("meta")`` (shapes only) instead of ``build_model``.

    Returns:
        the model.
    """
    if not meta:
        return build_model(cfg)
    with torch.device("meta"):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


def parameter_report(model: torch.nn.Module, max_depth: int) -> str:
    """fvcore's per-module parameter table followed by ``total_parameters: N``."""
    total = sum(p.numel() for p in model.parameters())
    table = parameter_count_table(model, max_depth=max_depth)
    return f"{table}\ntotal_parameters: {total}"


def flop_report(model: torch.nn.Module, cfg, height: int, width: int) -> str:
    """Count one forward pass (see the module docstring).

    Args:
        model: a ``FIBER`` or ``FIBERCoarse`` model on the CPU.
        cfg: its config (text length, pad id).
        height, width: input image size (already padded).

    Returns:
        fvcore's flop table followed by ``total_flops: N``.
    """
    model.eval()
    t = cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    image = torch.zeros(1, 3, height, width)
    ids = torch.full((1, t), cfg.MODEL.LANGUAGE_BACKBONE.PAD_TOKEN_ID, dtype=torch.long)
    ids[0, 0], ids[0, -1] = 0, 2
    mask = torch.ones(1, t, dtype=torch.long)
    view = _CoarseView(model) if is_coarse_stage(cfg) else _DetectorView(model)
    flops = FlopCountAnalysis(view, (image, ids, mask))
    flops.set_op_handle("aten::matmul", _matmul_flops)
    flops.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = flops.total()
    skipped = flops.unsupported_ops()
    if skipped:
        logger.info("Ops without a flop counter (not counted): %s", dict(skipped))
    return f"{flop_count_table(flops, max_depth=4)}\ntotal_flops: {total}"


def _flop_size(cfg, args: argparse.Namespace) -> tuple[int, int]:
    h, w = tool_image_size(cfg, args.height, args.width)
    div = max(cfg.INPUT.SIZE_DIVISIBILITY, 1)
    return -(-h // div) * div, -(-w // div) * div


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, build the model and print the requested reports."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default="", metavar="FILE")
    parser.add_argument("--tasks", nargs="+", choices=["parameter", "flop"], default=["parameter"])
    parser.add_argument("--max-depth", type=int, default=3, help="depth of the parameter table")
    parser.add_argument("--height", type=int, default=None, help="flop input height")
    parser.add_argument("--width", type=int, default=None, help="flop input width")
    parser.add_argument(
        "--meta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build on the meta device (default: when 'parameter' is the only task)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    setup_logger(name="fiber_d2")
    meta = args.tasks == ["parameter"] if args.meta is None else args.meta
    try:
        if meta and "flop" in args.tasks:
            raise ValueError("--tasks flop runs the model and cannot use --meta")
        cfg = load_config(args.config_file, args.opts)
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.LANGUAGE_BACKBONE.WEIGHTS = ""  # counts do not depend on pretrained weights
        cfg.MODEL.SWIN.WEIGHTS = ""
        cfg.freeze()
        size = _flop_size(cfg, args) if "flop" in args.tasks else None
        model = build_analysis_model(cfg, meta)
    except (ConfigError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    for task in args.tasks:
        if task == "parameter":
            print(parameter_report(model, args.max_depth))
        else:
            try:
                print(flop_report(model, cfg, *size))
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                sys.exit(
                    f"error: --tasks flop at {size[0]}x{size[1]}: out of memory: {one_line(e)}"
                )


if __name__ == "__main__":
    main()
