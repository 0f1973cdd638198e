"""ONNX translation of fiber_d2's export-only custom op for torch.onnx's TorchScript-based exporter.

``fiber_d2::batched_nms`` becomes one ``NonMaxSuppression`` with one score row per group: ONNX's
NMS is per (batch, class), so a box scores ``-1`` in every row but its group's and
``score_threshold`` -0.5 drops it there. This is exact per-group NMS on the original coordinates
(torchvision's coordinate-offset trick would shift boxes by up to (groups x image side) and lose
float precision in the IoUs). Memory: groups x boxes scores (80 labels x 5000 candidates: 1.6 MB).
"""

from __future__ import annotations

import torch
from torch.onnx import symbolic_helper

__all__ = ["NMS_OP", "register_onnx_symbolics", "symbolic_batched_nms"]

NMS_OP = "fiber_d2::batched_nms"

_INT64_MAX = 0x7FFFFFFFFFFFFFFF


def _const(g, value, dtype=None):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


@symbolic_helper.parse_args("v", "v", "v", "f")
def symbolic_batched_nms(g, boxes, scores, idxs, iou_threshold: float):
    """``fiber_d2::batched_nms``: boxes (M, 4), scores (M,) >= 0, idxs (M,) -> kept indices (K,)."""
    # number of groups; the appended -1 keeps ReduceMax defined when there is no box
    padded = g.op("Concat", idxs, _const(g, [-1]), axis_i=0)
    num_groups = g.op("Add", g.op("ReduceMax", padded, keepdims_i=0), _const(g, 1))
    groups = g.op("Range", _const(g, 0), num_groups, _const(g, 1))
    member = g.op(
        "Equal", g.op("Unsqueeze", idxs, _const(g, [0])), g.op("Unsqueeze", groups, _const(g, [1]))
    )  # (G, M)
    group_scores = g.op(
        "Where",
        member,
        g.op("Unsqueeze", scores, _const(g, [0])),
        _const(g, -1.0, torch.float32),
    )
    selected = g.op(
        "NonMaxSuppression",
        g.op("Unsqueeze", boxes, _const(g, [0])),
        g.op("Unsqueeze", group_scores, _const(g, [0])),
        _const(g, [_INT64_MAX]),
        _const(g, [iou_threshold], torch.float32),
        _const(g, [-0.5], torch.float32),
    )  # (K, 3): batch, group, box
    column = g.op("Slice", selected, _const(g, [2]), _const(g, [3]), _const(g, [1]))
    return g.op("Reshape", column, _const(g, [-1]))


def register_onnx_symbolics(opset: int) -> None:
    """Register the custom op's translation for ``torch.onnx.export(..., dynamo=False)``."""
    from . import graph  # noqa: F401  (registers fiber_d2::batched_nms)

    torch.onnx.register_custom_op_symbolic(NMS_OP, symbolic_batched_nms, opset)
