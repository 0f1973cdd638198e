"""Export a FIBER detector to ONNX, a ``torch.export`` program or TorchScript.

The exported function is :class:`~fiber_d2.deploy.graph.ExportableFIBER` (backbone, head, anchors
and post-processing). Dynamic dimensions (ONNX and ``torch.export``): batch ``B`` (1 ..
``max_batch``), padded image height and width (multiples of the size divisibility in
[``min_side``, ``max_side``]), text length ``T`` (up to ``MAX_QUERY_LEN``) and the number of
labels ``L`` (up to ``T - 2``). TorchScript (``torch.jit.trace``) records the shapes of the sample
as constants, so a TorchScript export runs at the sample's padded size and text length only (the
metadata says so and the runner checks it).

Next to the model file the export writes ``fiber_export.json`` (what the runners of
:mod:`fiber_d2.deploy.runtime` need: tokenizer, resize, normalisation, dynamic ranges) and the
full config as ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import List

import torch
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY

from ..modeling.meta_arch.fiber import FIBER
from .graph import ExportableFIBER
from .runtime import METADATA_FILE, graph_inputs

__all__ = [
    "FORMATS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "check_exportable",
    "default_side_range",
    "export_detector",
]

logger = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torch.export": "model.pt2", "torchscript": "model.ts"}
"""Supported formats and the model file each writes."""

INPUT_NAMES = ["images", "image_sizes", "input_ids", "attention_mask", "label_token_map"]
OUTPUT_NAMES = ["batch_index", "boxes", "scores", "labels"]

# DyHead's coarser-level branch reads a prefix of the finer level's offset buffer; the reading
# differs in kind when two adjacent pyramid levels have the same size, which happens for P6/P7
# when a side is below 3 size-divisibility units (96 pixels for FIBER's 32).
_MIN_SIDE_UNITS = 3


def check_exportable(cfg: CfgNode, fmt: str) -> None:
    """Raise a clear error for a config or format that cannot be exported.

    Raises:
        ValueError: unknown format, or a meta-architecture other than the fine-grained ``FIBER``
            (the coarse-grained pre-training stage has no detection output to export).
    """
    supported = f"formats {', '.join(sorted(FORMATS))} of the fine-grained detector 'FIBER'"
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; supported: {supported}")
    arch = cfg.MODEL.META_ARCHITECTURE
    cls = META_ARCH_REGISTRY.get(arch)
    if not (isinstance(cls, type) and issubclass(cls, FIBER)):
        raise ValueError(
            f"MODEL.META_ARCHITECTURE {arch!r} cannot be exported (the coarse-grained pre-training "
            f"stage predicts no boxes); supported: {supported}"
        )


def default_side_range(cfg: CfgNode, size_divisibility: int) -> tuple[int, int]:
    """Default dynamic range of the padded image sides: from 3 divisibility units (the smallest
    size where every pyramid level differs from its neighbour) to ``MAX_SIZE_TEST`` (padded)."""
    div = max(size_divisibility, 1)
    longest = max(cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    return _MIN_SIDE_UNITS * div, int(math.ceil(longest / div)) * div


def _dynamic_shapes(div: int, min_side: int, max_side: int, max_text: int, max_batch: int):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch)
    height = div * Dim("height_units", min=min_side // div, max=max_side // div)
    width = div * Dim("width_units", min=min_side // div, max=max_side // div)
    text = Dim("text_len", min=3, max=max_text)
    labels = Dim("num_labels", min=1, max=max_text)
    return (
        {0: batch, 2: height, 3: width},
        {0: batch},
        {0: batch, 1: text},
        {0: batch, 1: text},
        {0: batch, 1: labels, 2: text},
    )


def _trace_sample(inputs: tuple, div: int, max_side: int) -> tuple:
    """The tracing sample, adjusted so that no dynamic dimension is specialised.

    ``torch.export`` specialises dimensions of size 0 or 1 and gives dimensions of equal sample
    sizes one symbol, so the sample gets a batch of 2 (the first image repeated), at least 3
    labels (empty rows), a label count different from the text length, and, for a square image,
    one more padding unit on one side.
    """
    images, sizes, ids, mask, label_map = inputs
    if images.shape[0] == 1:
        images, sizes, ids, mask, label_map = (t.repeat_interleave(2, 0) for t in inputs)
    num_labels = max(label_map.shape[1], 3)
    if num_labels == ids.shape[1]:
        num_labels += 1
    if num_labels > label_map.shape[1]:
        extra = label_map.new_zeros(
            label_map.shape[0], num_labels - label_map.shape[1], label_map.shape[2]
        )
        label_map = torch.cat([label_map, extra], dim=1)
    height, width = images.shape[-2:]
    if height == width:
        pad = (0, div, 0, 0) if width + div <= max_side else (0, 0, 0, div)
        images = torch.nn.functional.pad(images, pad)
    return images, sizes, ids, mask, label_map


def _metadata(cfg: CfgNode, fmt: str, model: FIBER, ranges: dict) -> dict:
    lang = cfg.MODEL.LANGUAGE_BACKBONE
    return {
        "format": fmt,
        "file": FORMATS[fmt],
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "device": str(model.device),
        "torch_version": torch.__version__,
        "tokenizer": lang.TOKENIZER,
        "max_query_len": lang.MAX_QUERY_LEN,
        "separator": cfg.DATASETS.SEPARATION_TOKENS,
        "chunk_size": cfg.TEST.CHUNKED_EVALUATION,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
        "size_divisibility": model.backbone.size_divisibility,
        "inputs": INPUT_NAMES,
        "outputs": OUTPUT_NAMES,
        **ranges,
    }


def export_detector(
    cfg: CfgNode,
    model: FIBER,
    fmt: str,
    output_dir: str | os.PathLike,
    records: List[dict],
    *,
    min_side: int | None = None,
    max_side: int | None = None,
    max_batch: int = 8,
    opset: int = 18,
    program: torch.export.ExportedProgram | None = None,
) -> Path:
    """Export ``model`` and write the runners' metadata.

    Args:
        cfg: the model's config (written next to the export).
        model: a FIBER detector (eval mode is set here).
        fmt: ``"onnx"``, ``"torch.export"`` or ``"torchscript"``.
        output_dir: directory receiving the model file, ``fiber_export.json`` and ``config.yaml``.
        records: sample inputs, as the predictor prepares them (``image`` uint8 (3, h, w) resized,
            ``input_ids`` / ``attention_mask`` (T,), ``label_token_map`` (L, T)).
        min_side, max_side: dynamic range of the padded image sides (default
            :func:`default_side_range`); ignored by TorchScript (fixed to the sample).
        max_batch: largest batch of the dynamic batch dimension.
        opset: ONNX opset.
        program: an earlier ``torch.export`` of the same model and ranges (e.g. loaded from a
            ``torch.export`` directory) to save or convert instead of tracing again.

    Returns:
        the model file.

    Raises:
        ValueError: unsupported config or format, or a sample outside the requested ranges.
    """
    check_exportable(cfg, fmt)
    div = model.backbone.size_divisibility
    default_low, default_high = default_side_range(cfg, div)
    low = default_low if min_side is None else int(min_side)
    high = default_high if max_side is None else int(max_side)
    if low % div or high % div or not _MIN_SIDE_UNITS * div <= low <= high:
        raise ValueError(
            f"image side range [{low}, {high}] must hold multiples of the size divisibility {div}, "
            f"with the minimum at least {_MIN_SIDE_UNITS * div}"
        )
    wrapper = ExportableFIBER(model).eval()
    inputs = graph_inputs(
        records, model.pixel_mean.flatten().tolist(), model.pixel_std.flatten().tolist(), div
    )
    inputs = tuple(t.to(model.device) for t in inputs)
    height, width = inputs[0].shape[-2:]
    max_text = min(
        cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN, model.backbone.bottom_up.text_tower.max_len
    )
    if not (low <= height <= high and low <= width <= high):
        raise ValueError(f"sample image (padded {height}x{width}) is outside [{low}, {high}]")
    if inputs[2].shape[1] > max_text or len(records) > max_batch:
        raise ValueError(
            f"sample text length {inputs[2].shape[1]} / batch {len(records)} exceed the maximum "
            f"{max_text} / {max_batch}"
        )
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FORMATS[fmt]
    shapes = _dynamic_shapes(div, low, high, max_text, max_batch)
    ranges = {"min_side": low, "max_side": high, "max_text_len": max_text, "max_batch": max_batch}
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, inputs, check_trace=False)
            traced.save(str(path))
            ranges = {
                "min_side": int(min(height, width)),
                "max_side": int(max(height, width)),
                "fixed_size": [int(height), int(width)],
                "max_text_len": int(inputs[2].shape[1]),
                "fixed_text_len": int(inputs[2].shape[1]),
                "max_batch": max_batch,
            }
        else:
            sample = _trace_sample(inputs, div, high)
            if program is None:
                program = torch.export.export(wrapper, sample, dynamic_shapes=shapes)
            if fmt == "torch.export":
                torch.export.save(program, str(path))
            else:
                from .onnx_ops import custom_translation_table

                onnx_program = torch.onnx.export(
                    program,
                    sample,
                    input_names=INPUT_NAMES,
                    output_names=OUTPUT_NAMES,
                    opset_version=opset,
                    custom_translation_table=custom_translation_table(),
                    dynamo=True,
                    optimize=True,
                )
                onnx_program.save(str(path))
    meta = _metadata(cfg, fmt, model, ranges)
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "config.yaml").write_text(cfg.dump())
    logger.info("exported %s (%s) to %s", type(model).__name__, fmt, path)
    return path
