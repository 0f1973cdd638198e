"""RefCOCO precision@k with generalized IoU, on hand-built expressions."""

import json
import math

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from fiber_d2.evaluation import EvaluationCoverageError
from fiber_d2.evaluation.refexp import RefExpEvaluator, topk_giou_hits

NAME = "fiber_test_refexp_eval"
GT = [0.0, 0.0, 10.0, 10.0]
MISS = [50.0, 50.0, 60.0, 60.0]
# IoU with GT just above 0.5, GIoU just below: the two criteria disagree.
SHIFTED = [1.7, 1.7, 11.7, 11.7]


def _iou_giou(a, b):
    """Independent scalar IoU / GIoU of two xyxy boxes (no +1)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def _record(image_id, boxes=(GT,)):
    phrase = {"text": "the dog", "tokens_positive": [[0, 7]], "boxes": [list(b) for b in boxes]}
    return {"image_id": image_id, "caption": "the dog", "task": "refexp", "phrases": [phrase]}


RECORDS = [_record(i) for i in range(1, 6)]
ONE = NAME + "_one"  # record 1 only
BAD = NAME + "_bad"  # record 9 has two GT boxes
EMPTY = NAME + "_empty"  # no records: every metric undefined


@pytest.fixture(autouse=True)
def registered():
    sets = {NAME: RECORDS, ONE: RECORDS[:1], BAD: [_record(9, boxes=(GT, MISS))], EMPTY: []}
    for name, records in sets.items():
        DatasetCatalog.register(name, lambda records=records: records)
        MetadataCatalog.get(name).set(evaluator_type="refexp")
    yield
    for name in sets:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _instances(dets):
    """The model's output for dets, a list of (score, xyxy as the original's evaluation reads it:
    the legacy box scaled to the image); the model adds 1 to x2, y2 (``to_image_frame``), which the
    evaluator takes off again. Classes are arbitrary (not used by the metric)."""
    inst = Instances((100, 100))
    inst.scores = torch.tensor([d[0] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.arange(len(dets)) % 3
    boxes = torch.tensor([d[1] for d in dets], dtype=torch.float32).reshape(-1, 4)
    inst.pred_boxes = Boxes(boxes + torch.tensor([0.0, 0.0, 1.0, 1.0]))
    return inst


def test_giou_and_iou_disagree_on_the_shifted_box():
    iou, giou = _iou_giou(SHIFTED, GT)
    assert iou > 0.5 > giou  # the case is meaningful
    hits = topk_giou_hits(
        torch.tensor([SHIFTED]), torch.tensor([1.0]), torch.tensor([GT]), topk=(1,)
    )
    assert hits == (False,)


def test_giou_of_exactly_the_threshold_is_a_hit():
    """The criterion is GIoU >= 0.5: the GT's upper half has IoU 50 / 100 and the GT as its hull,
    so GIoU is exactly 0.5."""
    half = [0.0, 0.0, 10.0, 5.0]
    assert _iou_giou(half, GT) == (0.5, 0.5)
    hits = topk_giou_hits(torch.tensor([half]), torch.tensor([1.0]), torch.tensor([GT]), topk=(1,))
    assert hits == (True,)


def test_precision_hand_computed():
    outputs = [
        [(0.9, GT), (0.1, MISS)],  # 1: top-1 right
        [(0.9, MISS), (0.8, MISS), (0.7, GT)],  # 2: right at k = 3
        [(0.9, SHIFTED)],  # 3: IoU would accept, GIoU rejects
        [],  # 4: nothing predicted
        [(0.9 - 0.01 * i, MISS) for i in range(6)] + [(0.05, GT)],  # 5: right at k = 7
    ]
    ev = RefExpEvaluator(NAME, distributed=False)
    ev.reset()
    ev.process(
        [{"image_id": i} for i in range(1, 6)],
        [{"instances": _instances(d[::-1])} for d in outputs],  # reversed: the metric sorts
    )
    res = ev.evaluate()["refexp"]
    assert res == pytest.approx({"P@1": 20.0, "P@5": 40.0, "P@10": 60.0})


def test_perfect_and_empty():
    ev = RefExpEvaluator(NAME, distributed=False)
    ev.process([{"image_id": i} for i in range(1, 6)], [{"instances": _instances([(0.3, GT)])}] * 5)
    assert ev.evaluate()["refexp"] == {"P@1": 100.0, "P@5": 100.0, "P@10": 100.0}
    ev = RefExpEvaluator(ONE, distributed=False)
    ev.process([{"image_id": 1}], [{"instances": _instances([])}])
    assert ev.evaluate()["refexp"] == {"P@1": 0.0, "P@5": 0.0, "P@10": 0.0}


def test_metrics_file_is_strict_json(tmp_path):
    """``refexp_results.json`` holds what evaluate() returns; an undefined metric is null."""
    ev = RefExpEvaluator(ONE, distributed=False, output_dir=str(tmp_path / "a"))
    ev.process([{"image_id": 1}], [{"instances": _instances([(0.3, GT)])}])
    result = ev.evaluate()
    assert json.loads((tmp_path / "a" / "refexp_results.json").read_text()) == result
    ev = RefExpEvaluator(EMPTY, distributed=False, output_dir=str(tmp_path / "b"))
    assert all(math.isnan(v) for v in ev.evaluate()["refexp"].values())
    text = (tmp_path / "b" / "refexp_results.json").read_text()
    assert "NaN" not in text and json.loads(text) == {
        "refexp": dict.fromkeys(["P@1", "P@5", "P@10"])
    }


def test_ties_go_to_the_larger_box_as_in_the_original():
    # equal scores: sorted by (score, x1, y1, x2, y2), larger first -> MISS (50, ...) before GT
    ev = RefExpEvaluator(ONE, distributed=False, topk=(1, 2))
    ev.process([{"image_id": 1}], [{"instances": _instances([(0.5, GT), (0.5, MISS)])}])
    assert ev.evaluate()["refexp"] == {"P@1": 0.0, "P@2": 100.0}
    ev.reset()
    ev.process([{"image_id": 1}], [{"instances": _instances([(0.5, MISS), (0.5, GT)])}])
    assert ev.evaluate()["refexp"] == {"P@1": 0.0, "P@2": 100.0}  # input order does not matter
    ev.reset()
    low = [0.0, 0.0, 10.0, 9.0]  # same x1, y1, x2 as GT, smaller y2: GT wins the tie
    ev.process([{"image_id": 1}], [{"instances": _instances([(0.5, low), (0.5, GT)])}])
    assert ev.evaluate()["refexp"]["P@1"] == 100.0
    hits = topk_giou_hits(
        torch.tensor([GT, MISS]), torch.tensor([0.6, 0.5]), torch.tensor([GT]), topk=(1,)
    )
    assert hits == (True,)  # a higher score wins over larger coordinates


def test_errors():
    ev = RefExpEvaluator(BAD, distributed=False)
    with pytest.raises(ValueError, match="record 9 must have exactly 1 GT box, has 2"):
        ev.process([{"image_id": 9}], [{"instances": _instances([])}])
    ev.reset()
    ev.process([{"image_id": 77}], [{"instances": _instances([])}])
    with pytest.raises(EvaluationCoverageError, match="not in the dataset .image_id 77"):
        ev.evaluate()


def test_boxes_are_compared_as_the_original_reads_them():
    """The model's box (0, 0, 11, 21) (``_instances`` of (0, 0, 10, 20)) is read as the original's
    scaled legacy box (0, 0, 10, 20): GIoU 0.5 with the GT, a hit; as given it is 100 / 231."""
    assert _iou_giou([0.0, 0.0, 10.0, 20.0], GT) == (0.5, 0.5)
    ev = RefExpEvaluator(ONE, distributed=False)
    ev.process([{"image_id": 1}], [{"instances": _instances([(0.9, [0.0, 0.0, 10.0, 20.0])])}])
    assert ev.evaluate()["refexp"]["P@1"] == 100.0


def test_the_evaluator_uses_its_threshold():
    """With threshold 0.6 the GT's upper half (GIoU 0.5, a hit at the default 0.5) misses, and the
    box (0, 0, 10, 6) (IoU 60 / 100, the GT as its hull: GIoU 0.6) hits."""
    assert _iou_giou([0.0, 0.0, 10.0, 6.0], GT) == pytest.approx((0.6, 0.6))
    for box, expected in (([0.0, 0.0, 10.0, 5.0], 0.0), ([0.0, 0.0, 10.0, 6.0], 100.0)):
        ev = RefExpEvaluator(ONE, distributed=False, threshold=0.6)
        ev.process([{"image_id": 1}], [{"instances": _instances([(0.9, box)])}])
        assert ev.evaluate()["refexp"]["P@1"] == expected, box
