"""Tests of fiber_d2.inference.outputs: threshold / NMS / top-k selection and COCO records."""

import pytest
import torch
from detectron2.structures import Boxes, Instances

from fiber_d2.inference.outputs import check_selection, select_detections, to_coco_json


def _instances():
    inst = Instances((50, 60))
    # boxes 0 and 2 overlap (IoU 0.9), so do boxes 1 and 3 (IoU 0.8)
    boxes = [[0, 0, 10, 10], [30, 30, 40, 45], [0, 0, 10, 9], [32, 30, 40, 45]]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float16))
    inst.scores = torch.tensor([0.5, 0.9, 0.7, 0.2], dtype=torch.float16)
    inst.pred_classes = torch.tensor([0, 1, 2, 1])
    return inst


def _select(**kw):
    options = {"threshold": None, "nms": False, "top": None, "nms_threshold": 0.6}
    return select_detections(_instances(), **{**options, **kw})


def test_select_sorts_thresholds_and_keeps_top_k():
    inst = _select()
    assert inst.scores.dtype == inst.pred_boxes.tensor.dtype == torch.float32
    assert inst.pred_classes.tolist() == [1, 2, 0, 1]
    assert _select(threshold=0.5).pred_classes.tolist() == [1, 2, 0]
    assert _select(top=2).pred_classes.tolist() == [1, 2]
    assert len(_select(threshold=1.0)) == 0 and len(_select(threshold=1.0, nms=True)) == 0


def test_class_agnostic_nms_iou():
    # nms=True uses nms_threshold: 0.6 suppresses both overlapping pairs
    assert _select(nms=True).pred_classes.tolist() == [1, 2]
    assert _select(nms=True, nms_threshold=0.95).pred_classes.tolist() == [1, 2, 0, 1]
    assert _select(nms=0.85).pred_classes.tolist() == [1, 2, 1]  # IoUs 0.9 and 0.8
    assert _select(nms=None).pred_classes.tolist() == [1, 2, 0, 1]


@pytest.mark.parametrize(
    "args, needle",
    [
        ((1.5, False, None), "threshold must be in"),
        (("0.3", False, None), "threshold must be in"),
        ((None, False, 0), "max_detections must be a positive int"),
        ((None, False, 2.0), "max_detections must be a positive int"),
        ((None, 0.0, None), "class_agnostic_nms IoU"),
    ],
)
def test_check_selection(args, needle):
    with pytest.raises(ValueError, match=needle):
        check_selection(*args)
    check_selection(0.3, True, 5)


def test_to_coco_json_labels_and_ids():
    inst = _select(top=2)
    result = {"instances": inst, "label_names": ["circle", "square", "triangle"]}
    records = to_coco_json(result, 7)
    assert [r["label"] for r in records] == ["square", "triangle"]
    assert [r["category_id"] for r in records] == [2, 3]
    assert records[0]["image_id"] == 7
    assert records[0]["bbox"] == pytest.approx([30, 30, 10, 15])
    assert records[0]["score"] == pytest.approx(0.9, abs=1e-3)
    mapped = to_coco_json([result, result], [1, 2], category_ids=[11, 12, 13])
    assert [(r["image_id"], r["category_id"]) for r in mapped] == [
        (1, 12),
        (1, 13),
        (2, 12),
        (2, 13),
    ]
    with pytest.raises(ValueError, match="2 results need 2 image ids, got 1"):
        to_coco_json([result, result], [1])
