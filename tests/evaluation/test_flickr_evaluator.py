"""Flickr30k phrase-grounding recall on hand-built sentences with hand-computed recalls."""

import logging

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from fiber_d2.evaluation import EvaluationCoverageError
from fiber_d2.evaluation.flickr import FlickrRecallEvaluator, phrase_hit_rank

NAME = "fiber_test_flickr_eval"
MISS = [300.0, 300.0, 310.0, 310.0]  # overlaps no GT box below


def _phrase(boxes, phrase_type):
    return {"text": "x", "tokens_positive": [[0, 1]], "boxes": boxes, "phrase_type": phrase_type}


RECORDS = [
    {
        "image_id": 1,
        "caption": "a sentence",
        "task": "grounding",
        "phrases": [
            _phrase([[0, 0, 10, 10]], "people"),  # 0: hit at rank 0
            _phrase([[20, 20, 30, 30], [50, 50, 60, 60]], ["clothing"]),  # 1: 2nd GT at rank 1
            _phrase([], "other"),  # 2: no box -> skipped
            _phrase([[0, 0, 100, 100]], "scene"),  # 3: no prediction -> dummy box only
        ],
    },
    {
        "image_id": 2,
        "caption": "another sentence",
        "task": "grounding",
        "phrases": [
            _phrase([[5, 5, 15, 15]], "people"),  # 0: rank 0
            _phrase([[40, 40, 80, 80]], "other"),  # 1: rank 6
            _phrase([[100, 100, 120, 140]], "other"),  # 2: rank 11 (upper bound only)
        ],
    },
]


ONE = NAME + "_one"  # image 1 only


@pytest.fixture(autouse=True)
def registered():
    for name, records in ((NAME, RECORDS), (ONE, RECORDS[:1])):
        DatasetCatalog.register(name, lambda records=records: records)
        MetadataCatalog.get(name).set(evaluator_type="flickr")
    yield
    for name in (NAME, ONE):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _instances(dets, size=(200, 200)):
    """dets: list of (score, phrase index, xyxy box)."""
    inst = Instances(size)
    inst.scores = torch.tensor([d[0] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([d[1] for d in dets], dtype=torch.long)
    inst.pred_boxes = Boxes(torch.tensor([d[2] for d in dets], dtype=torch.float32).reshape(-1, 4))
    return inst


def _predictions():
    rec1 = [
        (0.9, 0, [0, 0, 10, 10]),
        (0.8, 1, [100, 100, 110, 110]),
        (0.7, 1, [50, 50, 60, 60]),
        (0.95, 2, [0, 0, 10, 10]),  # phrase without boxes: ignored
        (0.99, 7, [0, 0, 100, 100]),  # label beyond the phrases: ignored
    ]
    rec2 = [(0.5, 0, [5, 5, 15, 15])]
    rec2 += [(0.9 - 0.01 * i, 1, MISS) for i in range(6)] + [(0.1, 1, [40, 40, 80, 80])]
    rec2 += [(0.9 - 0.01 * i, 2, MISS) for i in range(11)] + [(0.05, 2, [100, 100, 120, 140])]
    # Shuffle so that the evaluator has to sort by score itself.
    perm = torch.randperm(len(rec2), generator=torch.Generator().manual_seed(0)).tolist()
    rec2 = [rec2[i] for i in perm]
    return [{"image_id": 1}, {"image_id": 2}], [
        {"instances": _instances(rec1)},
        {"instances": _instances(rec2)},
    ]


def test_recall_hand_computed():
    ev = FlickrRecallEvaluator(NAME, distributed=False)
    ev.reset()
    inputs, outputs = _predictions()
    ev.process(inputs[:1], outputs[:1])
    ev.process(inputs[1:], outputs[1:])
    res = ev.evaluate()["grounding"]
    # 6 phrases with boxes; first-hit ranks 0, 1, -1 | 0, 6, 11.
    assert res["R@1"] == pytest.approx(100 * 2 / 6)
    assert res["R@5"] == pytest.approx(100 * 3 / 6)
    assert res["R@10"] == pytest.approx(100 * 4 / 6)
    assert res["upper_bound"] == pytest.approx(100 * 5 / 6)
    assert res["R@1-people"] == 100.0
    assert res["R@1-clothing"] == 0.0 and res["R@5-clothing"] == 100.0
    assert res["upper_bound-scene"] == 0.0
    assert res["R@5-other"] == 0.0 and res["R@10-other"] == 50.0
    assert res["upper_bound-other"] == 100.0


def test_a_phrase_of_several_types_counts_in_each():
    """Flickr30k Entities phrases may carry several types; a phrase's rank counts in every one."""
    name = NAME + "_types"
    record = {"image_id": 3, "caption": "c", "task": "grounding"}
    record["phrases"] = [
        _phrase([[0, 0, 10, 10]], ["people", "bodyparts"]),  # hit at rank 0
        _phrase([[20, 20, 30, 30]], "people"),  # missed
    ]
    DatasetCatalog.register(name, lambda: [record])
    try:
        ev = FlickrRecallEvaluator(name, distributed=False)
        ev.reset()
        dets = [(0.9, 0, [0, 0, 10, 10]), (0.8, 1, MISS)]
        ev.process([{"image_id": 3}], [{"instances": _instances(dets)}])
        res = ev.evaluate()["grounding"]
    finally:
        DatasetCatalog.remove(name)
    assert res["R@1"] == 50.0
    assert res["R@1-people"] == 50.0 and res["R@1-bodyparts"] == 100.0


def test_perfect_and_empty():
    inputs = [{"image_id": 1}, {"image_id": 2}]
    perfect = []
    for rec in RECORDS:
        dets = [(0.5, i, p["boxes"][0]) for i, p in enumerate(rec["phrases"]) if p["boxes"]]
        perfect.append({"instances": _instances(dets)})
    ev = FlickrRecallEvaluator(NAME, distributed=False)
    ev.process(inputs, perfect)
    res = ev.evaluate()["grounding"]
    assert res["R@1"] == res["upper_bound"] == 100.0

    ev.reset()
    ev.process(inputs, [{"instances": _instances([])} for _ in inputs])
    res = ev.evaluate()["grounding"]
    assert res["R@1"] == res["R@10"] == res["upper_bound"] == 0.0


def test_dummy_box_and_iou_without_plus_one():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    dummy = torch.zeros(1, 4)
    # Only the dummy box: a miss, not an error.
    assert phrase_hit_rank(dummy, gt, 0.5) == -1
    # [0, 0, 10, 4.9]: IoU 49/100 without +1 (a miss), 11*5.9/121 = 0.54 with +1.
    assert phrase_hit_rank(torch.tensor([[0.0, 0.0, 10.0, 4.9]]), gt, 0.5) == -1
    # [0, 0, 10, 5]: exactly 0.5 -> a hit (>=).
    assert phrase_hit_rank(torch.tensor([[0.0, 0.0, 10.0, 5.0]]), gt, 0.5) == 0


def test_ties_keep_input_order():
    # Two boxes for phrase 0 of image 1 with the same score; the first one given is a miss.
    record = {"image_id": 1}
    dets = [(0.9, 0, MISS), (0.9, 0, [0, 0, 10, 10])]
    ev = FlickrRecallEvaluator(ONE, distributed=False, topk=(1, 2))
    ev.process([record], [{"instances": _instances(dets)}])
    res = ev.evaluate()["grounding"]
    # Phrases of image 1: 0 (rank 1 now), 1 and 3 (no predictions) -> R@1 0, R@2 1/3.
    assert res["R@1"] == 0.0 and res["R@2"] == pytest.approx(100 / 3)
    ev.reset()
    ev.process([record], [{"instances": _instances(dets[::-1])}])
    assert ev.evaluate()["grounding"]["R@1"] == pytest.approx(100 / 3)


def test_separate_vs_merged_gt():
    # Phrase 1 of image 1 has GT boxes [20,20,30,30] and [50,50,60,60]; enclosing [20,20,60,60].
    dets = [(0.9, 1, [20, 20, 60, 58]), (0.8, 1, [50, 50, 60, 60])]
    outputs = [{"instances": _instances(dets)}]
    separate = FlickrRecallEvaluator(ONE, distributed=False, gt_type="separate")
    separate.process([{"image_id": 1}], outputs)
    merged = FlickrRecallEvaluator(ONE, distributed=False, gt_type="merged")
    merged.process([{"image_id": 1}], outputs)
    # separate: 1st box IoU 100/1520 and 80/1540 -> miss, 2nd box = 2nd GT -> rank 1.
    # merged: 1st box IoU 1520/1600 -> rank 0; the 2nd box (IoU 100/1600) would miss.
    assert separate.evaluate()["grounding"]["R@1-clothing"] == 0.0
    assert merged.evaluate()["grounding"]["R@1-clothing"] == 100.0
    assert separate.evaluate()["grounding"]["R@5-clothing"] == 100.0


def test_errors():
    with pytest.raises(ValueError, match="gt_type"):
        FlickrRecallEvaluator(NAME, gt_type="any")
    ev = FlickrRecallEvaluator(NAME, distributed=False)
    ev.reset()
    ev.process([{"image_id": 99}], [{"instances": _instances([])}])
    with pytest.raises(EvaluationCoverageError, match="not in the dataset .image_id 99"):
        ev.evaluate()
    with pytest.raises(KeyError, match="not registered"):
        FlickrRecallEvaluator("fiber_no_such_dataset", distributed=False).process(
            [{"image_id": 1}], [{"instances": _instances([])}]
        )


def test_copypaste_lines_are_left_to_the_trainer():
    """The evaluator logs no copypaste lines (detectron2's trainer prints them once per dataset);
    printed from its results, the per-type keys are left out."""
    from detectron2.evaluation.testing import print_csv_format

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    target = logging.getLogger("detectron2.evaluation.testing")
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        ev = FlickrRecallEvaluator(NAME, distributed=False)
        ev.process(*_predictions())
        results = ev.evaluate()
        assert records == []
        print_csv_format(results)
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)
    lines = [r.getMessage() for r in records]
    assert lines[0] == "copypaste: Task: grounding"
    assert lines[1] == "copypaste: R@1,R@5,R@10,upper_bound"  # per-type keys are left out
    assert lines[2] == "copypaste: 33.3333,50.0000,66.6667,83.3333"
    assert len(lines) == 3
    assert "R@1-clothing" in results["grounding"] and "R@1-people" in results["grounding"]


def test_boxes_are_compared_as_the_original_reads_them():
    """The model's x2, y2 carry the +1 of its output convention; the original compares the legacy
    box scaled to the image, one pixel shorter: a model box (0, 0, 11, 21) is read as (0, 0, 10, 20),
    IoU 100 / 200 = 0.5 with the GT (0, 0, 10, 10), a hit, where as given it is 100 / 231."""
    ev = FlickrRecallEvaluator(ONE, distributed=False)
    ev.reset()
    dets = [(0.9, 0, [0, 0, 11, 21]), (0.8, 1, MISS)]
    ev.process([{"image_id": 1}], [{"instances": _instances(dets)}])
    assert ev.evaluate()["grounding"]["R@1-people"] == 100.0


def test_the_evaluator_counts_a_hit_from_iou_half():
    """Spec fine 5.1: a hit needs IoU >= 0.5 (the evaluator's default). The model box
    (0, 0, 11, 6) is read as (0, 0, 10, 5): IoU 50 / 100 with the GT (0, 0, 10, 10), a hit;
    (0, 0, 11, 5.9) is read as (0, 0, 10, 4.9): IoU 49 / 100, a miss."""
    for box, expected in (([0, 0, 11, 6], 100.0), ([0, 0, 11, 5.9], 0.0)):
        ev = FlickrRecallEvaluator(ONE, distributed=False)
        ev.process([{"image_id": 1}], [{"instances": _instances([(0.9, 0, box)])}])
        assert ev.evaluate()["grounding"]["R@1-people"] == expected, box


def test_the_evaluator_uses_its_iou_threshold():
    """With iou_threshold 0.6 the box read as (0, 0, 10, 5) (IoU 0.5 with the GT (0, 0, 10, 10))
    misses, and the one read as (0, 0, 10, 6) (IoU 0.6) hits."""
    for box, expected in (([0, 0, 11, 6], 0.0), ([0, 0, 11, 7], 100.0)):
        ev = FlickrRecallEvaluator(ONE, distributed=False, iou_threshold=0.6)
        ev.process([{"image_id": 1}], [{"instances": _instances([(0.9, 0, box)])}])
        assert ev.evaluate()["grounding"]["R@1-people"] == expected, box
