#!/usr/bin/env python
"""Time fiber_d2 components on random inputs and print ONE JSON line.

Example::

    python tools/benchmark.py --config-file configs/FIBER-B/coco.yaml --task backbone \\
        --height 800 --width 1333 --batch 1 --iters 2 --device cpu MODEL.SWIN.USE_CHECKPOINT False

Tasks live in ``TASKS`` (name -> function(cfg, args) -> dict of measurements); ``backbone`` times
the fused Swin-RoBERTa backbone with its FPN:

* ``fwd_ms_median``: eval-mode forward under ``torch.no_grad`` (inference latency);
* ``fwd_bwd_ms_median``: train-mode forward + backward of a scalar built from every output;
* ``peak_mem_mb``: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the growth of the
  process's peak resident set size (``getrusage`` max RSS) over the timed runs;
* ``tokens_per_s``: (stride-4 image tokens + text tokens) x batch per second of forward;
* ``params``: parameters of the timed module.

Images are padded up to the backbone's size divisibility (800x1333 runs at 800x1344), text has
``MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN`` tokens (FIBER always pads to 256).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import fiber_d2

__all__ = ["TASKS", "bench_backbone", "main", "setup_cfg"]

logger = logging.getLogger("fiber_d2.benchmark")


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """Build the config: detectron2 defaults + fiber_d2 defaults + file + command-line overrides."""
    cfg = get_cfg()
    fiber_d2.add_fiber_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _timed(fn: Callable[[], None], device: torch.device, iters: int) -> list[float]:
    fn()  # warm-up (allocator, kernels, lazy init)
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def bench_backbone(cfg: CfgNode, args: argparse.Namespace) -> dict:
    """Time forward and forward+backward of the fused backbone + FPN.

    Args:
        cfg: the config.
        args: parsed command line (height, width, batch, iters, device, amp).

    Returns:
        the measurements (see the module docstring).
    """
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_backbone(cfg, ShapeSpec(channels=3)).to(device)
    div = model.size_divisibility
    height = int(math.ceil(args.height / div) * div)
    width = int(math.ceil(args.width / div) * div)
    length = cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
    vocab = cfg.MODEL.LANGUAGE_BACKBONE.VOCAB_SIZE
    images = torch.randn(args.batch, 3, height, width, device=device)
    input_ids = torch.randint(3, vocab, (args.batch, length), device=device)
    attention_mask = torch.ones(args.batch, length, dtype=torch.long, device=device)
    real = min(length, 32)  # a short prompt padded to the full length, as FIBER does
    input_ids[:, real:] = cfg.MODEL.LANGUAGE_BACKBONE.PAD_TOKEN_ID
    attention_mask[:, real:] = 0
    autocast = (
        torch.autocast(
            device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16
        )
        if args.amp
        else nullcontext()
    )

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(images, input_ids, attention_mask)

    def forward_backward() -> None:
        with autocast:
            features, text = model(images, input_ids, attention_mask)
            loss = sum(f.float().mean() for f in features.values()) + text["hidden"].float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _max_rss_mb()
    model.eval()
    fwd = _timed(forward, device, args.iters)
    model.train()
    fwd_bwd = _timed(forward_backward, device, args.iters)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _max_rss_mb() - rss_before
    fwd_ms = statistics.median(fwd)
    tokens = args.batch * ((height // 4) * (width // 4) + length)
    return {
        "height": height,
        "width": width,
        "fwd_ms_median": round(fwd_ms, 2),
        "fwd_bwd_ms_median": round(statistics.median(fwd_bwd), 2),
        "peak_mem_mb": round(peak, 1),
        "tokens_per_s": round(tokens / (fwd_ms / 1000.0), 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


TASKS: dict[str, Callable[[CfgNode, argparse.Namespace], dict]] = {"backbone": bench_backbone}


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the task, print and return its JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="", help="yaml config (defaults are FIBER-B)")
    parser.add_argument("--task", default="backbone", choices=sorted(TASKS))
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (after 1 warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on GPU, bf16 on CPU)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = setup_cfg(args)
    result = TASKS[args.task](cfg, args)
    record = {
        "task": args.task,
        "config": args.config_file or "defaults",
        "device": str(torch.cuda.get_device_name(args.device) if "cuda" in args.device else "cpu"),
        "height": result.pop("height", args.height),
        "width": result.pop("width", args.width),
        "batch": args.batch,
        **result,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
