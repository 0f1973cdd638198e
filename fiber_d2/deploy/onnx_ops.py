"""ONNX translation of fiber_d2's export-only custom ops (written with onnxscript, trace-only).

``fiber_d2::batched_nms`` becomes one ``NonMaxSuppression`` with one score row per group: ONNX's
NMS is per (batch, class), so a box scores ``-1`` in every row but its group's and
``score_threshold`` -0.5 drops it there. This is exact per-group NMS on the original coordinates
(torchvision's coordinate-offset trick would shift boxes by up to (groups x image side) and lose
float precision in the IoUs). Memory: groups x boxes scores (80 labels x 5000 candidates: 1.6 MB).
"""

from __future__ import annotations

from onnxscript import FLOAT, INT64
from onnxscript.onnx_opset import opset18 as op

__all__ = ["onnx_batched_nms", "custom_translation_table"]

_INT64_MAX = 0x7FFFFFFFFFFFFFFF


def onnx_batched_nms(boxes: FLOAT, scores: FLOAT, idxs: INT64, iou_threshold: float) -> INT64:
    """``fiber_d2::batched_nms``: boxes (M, 4), scores (M,) >= 0, idxs (M,) -> kept indices."""
    # number of groups; the appended -1 keeps ReduceMax defined when there is no box
    padded = op.Concat(idxs, op.Constant(value_ints=[-1]), axis=0)
    num_groups = op.Add(op.ReduceMax(padded, keepdims=0), op.Constant(value_int=1))
    groups = op.Range(op.Constant(value_int=0), num_groups, op.Constant(value_int=1))
    member = op.Equal(op.Unsqueeze(idxs, [0]), op.Unsqueeze(groups, [1]))  # (G, M)
    minus_one = op.CastLike(op.Constant(value_float=-1.0), scores)
    group_scores = op.Where(member, op.Unsqueeze(scores, [0]), minus_one)
    selected = op.NonMaxSuppression(
        op.Unsqueeze(boxes, [0]),
        op.Unsqueeze(group_scores, [0]),
        op.Constant(value_int=_INT64_MAX),
        op.Constant(value_float=iou_threshold),
        op.Constant(value_float=-0.5),
    )  # (K, 3): batch, group, box
    return op.Reshape(op.Slice(selected, [2], [3], [1]), op.Constant(value_ints=[-1]))


def custom_translation_table() -> dict:
    """``torch.onnx.export(custom_translation_table=...)`` for the graph's custom ops."""
    import torch

    from . import graph  # noqa: F401  (registers fiber_d2::batched_nms)

    return {torch.ops.fiber_d2.batched_nms.default: onnx_batched_nms}
