"""Export a FIBER detector to ONNX or TorchScript.

The exported function is :class:`~fiber_d2.deploy.graph.ExportableFIBER` (backbone, head, anchors
and post-processing), traced once on a sample with ``torch.jit.trace``: TorchScript saves the trace,
ONNX converts it with torch.onnx's TorchScript-based exporter (``dynamo=False``), which takes seconds
for the tiny model. Under this tracer every size read from a tensor (``x.shape[i]``) is a traced value,
so the shape arithmetic of the model (Swin's window padding, partition and shifted-window masks, the
pyramid sizes, anchors, DyHead's resampling, the post-processing's top-k sizes) stays a function of
the input; Python decisions on sizes are frozen, and the graph keeps none that changes within the
supported ranges (see :func:`check_exportable` and ``_MIN_SIDE_UNITS``). Dynamic dimensions (both
formats): batch ``B``, padded image height and width (multiples of the size divisibility in
[``min_side``, ``max_side``]), text length ``T`` (up to ``MAX_QUERY_LEN``) and the number of labels
``L``; the runners refuse inputs outside these ranges.

Next to the model file the export writes ``fiber_export.json`` (what the runners of
:mod:`fiber_d2.deploy.runtime` need: tokenizer, resize, normalisation, dynamic ranges) and the
full config as ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import List

import torch
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY

from ..checkpoint.safe_io import replacing, write_whole
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
    "trace_graph",
]

logger = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
"""Supported formats and the model file each writes."""

INPUT_NAMES = ["images", "image_sizes", "input_ids", "attention_mask", "label_token_map"]
OUTPUT_NAMES = ["batch_index", "boxes", "scores", "labels"]
_DYNAMIC_AXES = {
    "images": {0: "batch", 2: "height", 3: "width"},
    "image_sizes": {0: "batch"},
    "input_ids": {0: "batch", 1: "text_len"},
    "attention_mask": {0: "batch", 1: "text_len"},
    "label_token_map": {0: "batch", 1: "num_labels", 2: "text_len"},
    **{name: {0: "num_detections"} for name in OUTPUT_NAMES},
}

# DyHead's coarser-level branch reads a prefix of the finer level's offset buffer; the reading
# differs in kind when two adjacent pyramid levels have the same size, which happens for P6/P7
# when a side is below 3 size-divisibility units (96 pixels for FIBER's 32).
_MIN_SIDE_UNITS = 3


def check_exportable(cfg: CfgNode, fmt: str) -> None:
    """Raise a clear error for a config or format that cannot be exported.

    Raises:
        ValueError: unknown format, a meta-architecture other than the fine-grained ``FIBER``
            (the coarse-grained pre-training stage has no detection output to export), or
            ``MODEL.SWIN.SHIFT_SINGLE_WINDOW`` False (a size-dependent branch a trace would freeze).
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
    if not cfg.MODEL.SWIN.SHIFT_SINGLE_WINDOW:
        raise ValueError(
            "MODEL.SWIN.SHIFT_SINGLE_WINDOW False cannot be exported: whether a block shifts would "
            "depend on the image size, which a traced graph cannot; supported: detector configs "
            "with the default True"
        )


def default_side_range(cfg: CfgNode, size_divisibility: int) -> tuple[int, int]:
    """Default dynamic range of the padded image sides: from 3 divisibility units (the smallest
    size where every pyramid level differs from its neighbour) to ``MAX_SIZE_TEST`` (padded)."""
    div = max(size_divisibility, 1)
    longest = max(cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    return _MIN_SIDE_UNITS * div, int(math.ceil(longest / div)) * div


def trace_graph(wrapper: ExportableFIBER, inputs: tuple) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the graph; the tracer's warnings (frozen input checks and
    constants, all size-independent within the export ranges) go to the debug log."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, inputs, check_trace=False)
    for w in caught:
        logger.debug("trace: %s:%s %s", w.filename, w.lineno, w.message)
    return traced


def _export_onnx(wrapper: ExportableFIBER, inputs: tuple, path: str, opset: int) -> None:
    """``torch.onnx.export`` of the graph to ``path`` (TorchScript-based exporter)."""
    from .onnx_ops import register_onnx_symbolics

    register_onnx_symbolics(opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # every advanced index of the graph is non-negative (anchor / candidate / relative
        # position indices), the case the exporter's Gather-based translation handles
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            wrapper,
            inputs,
            path,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=_DYNAMIC_AXES,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


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
        "pad_to_max_query_len": bool(cfg.INPUT.PAD_TO_MAX_QUERY_LEN),
        "separator": cfg.DATASETS.SEPARATION_TOKENS,
        "chunk_size": cfg.TEST.CHUNKED_EVALUATION,
        "nms_threshold": cfg.MODEL.ATSS.NMS_TH,
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
    opset: int = 17,
) -> Path:
    """Export ``model`` and write the runners' metadata.

    Args:
        cfg: the model's config (written next to the export).
        model: a FIBER detector on the CPU (eval mode is set here).
        fmt: ``"onnx"`` or ``"torchscript"``.
        output_dir: directory receiving the model file, ``fiber_export.json`` and ``config.yaml``.
        records: sample inputs, as the predictor prepares them (``image`` uint8 (3, h, w) resized,
            ``input_ids`` / ``attention_mask`` (T,), ``label_token_map`` (L, T)).
        min_side, max_side: range of the padded image sides the runners accept (default
            :func:`default_side_range`).
        max_batch: largest batch the runners accept.
        opset: ONNX opset.

    Returns:
        the model file.

    Raises:
        ValueError: unsupported config or format, or a sample outside the requested ranges.
    """
    check_exportable(cfg, fmt)
    if model.device.type != "cpu":
        # On CUDA the DyHead's deformable conv is torchvision's kernel, which the exporters do not
        # translate, and the graph would keep CUDA constants.
        raise ValueError(
            f"export_detector needs the model on the CPU, got {model.device}: export "
            "model.to('cpu') (tools/deploy/export_model.py sets MODEL.DEVICE cpu itself)"
        )
    div = model.backbone.size_divisibility
    default_low, default_high = default_side_range(cfg, div)
    low = default_low if min_side is None else int(min_side)
    high = default_high if max_side is None else int(max_side)
    if low % div or high % div or not _MIN_SIDE_UNITS * div <= low <= high:
        raise ValueError(
            f"image side range [{low}, {high}] must hold multiples of the size divisibility {div}, "
            f"with the minimum at least {_MIN_SIDE_UNITS * div}"
        )
    if max_batch < 1:
        raise ValueError(
            f"the largest batch (max_batch, --max-batch) must be at least 1, got {max_batch}"
        )
    wrapper = ExportableFIBER(model).eval()
    mean, std = model.pixel_mean.flatten().tolist(), model.pixel_std.flatten().tolist()
    inputs = graph_inputs(records, mean, std, div, model.pad_to_max_query_len)
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
    ranges = {"min_side": low, "max_side": high, "max_text_len": max_text, "max_batch": max_batch}
    meta = _metadata(cfg, fmt, model, ranges)
    # Each file appears whole (``replacing``); the metadata, which the runners read first, goes
    # before the others and comes back last, so a failed or killed export over an earlier one
    # leaves a folder the runners refuse rather than a new graph with an old metadata file.
    (out_dir / METADATA_FILE).unlink(missing_ok=True)
    try:
        with replacing(str(path)) as tmp:
            if fmt == "torchscript":
                trace_graph(wrapper, inputs).save(tmp)
            else:
                _export_onnx(wrapper, inputs, tmp, opset)
        with write_whole(str(out_dir / "config.yaml"), "w") as f:
            f.write(cfg.dump())
        with write_whole(str(out_dir / METADATA_FILE), "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise OSError(f"cannot write the export in {out_dir}: {e}") from e
    logger.info("exported %s (%s) to %s", type(model).__name__, fmt, path)
    return path
