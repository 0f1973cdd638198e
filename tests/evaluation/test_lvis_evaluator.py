"""LVIS Fixed AP: per-category top-k over the dataset, no per-image cap, on a tiny LVIS json."""

import json
import logging

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import LVISEvaluator
from detectron2.structures import Boxes, Instances

import fiber_d2.evaluation.lvis as lvis_module
from fiber_d2.evaluation.lvis import (
    FixedAPLVISEvaluator,
    _lvis_numpy_compat,
    keep_topk_per_category,
)

NAME = "fiber_test_lvis_eval"
N_FP = 300  # false positives per image, all scored above every true positive
FP_BOX = [600.0, 600.0, 650.0, 650.0]
A_BOX = [10.0, 10.0, 60.0, 60.0]  # category A (LVIS id 1, contiguous 0) in every image
B_BOX = [100.0, 100.0, 150.0, 150.0]  # category B (LVIS id 2, contiguous 1) in image 1


def _lvis_json(path):
    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    images = [
        {"id": i, "width": 1000, "height": 1000, "neg_category_ids": [], "file_name": f"{i}.jpg"}
        for i in (1, 2, 3)
    ]
    for img in images:
        img["not_exhaustive_category_ids"] = []
    anns = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": xywh(A_BOX), "area": 2500.0}
        for i in (1, 2, 3)
    ]
    anns.append({"id": 4, "image_id": 1, "category_id": 2, "bbox": xywh(B_BOX), "area": 2500.0})
    cats = [
        {"id": 1, "name": "a", "frequency": "f", "image_count": 3},
        {"id": 2, "name": "b", "frequency": "f", "image_count": 1},
    ]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


@pytest.fixture()
def registered(tmp_path):
    json_file = _lvis_json(tmp_path / "lvis_tiny.json")
    DatasetCatalog.register(NAME, lambda: [{"image_id": i} for i in (1, 2, 3)])
    MetadataCatalog.get(NAME).set(json_file=json_file, evaluator_type="lvis")
    yield NAME
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def _instances(dets):
    """dets: list of (score, contiguous class, xyxy)."""
    inst = Instances((1000, 1000))
    inst.scores = torch.tensor([d[0] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([d[1] for d in dets], dtype=torch.long)
    inst.pred_boxes = Boxes(torch.tensor([d[2] for d in dets], dtype=torch.float32).reshape(-1, 4))
    return inst


def _predictions():
    """Per image: 300 FPs of A (scores 0.5-0.99), then A's TP (0.10 / 0.09 / 0.08); image 1 also
    has B's TP at 0.05, the lowest score overall. Chunk outputs are pooled into one Instances."""
    inputs, outputs = [], []
    for n, image_id in enumerate((1, 2, 3)):
        dets = [(0.99 - 0.49 * j / N_FP, 0, FP_BOX) for j in range(N_FP)]
        dets.append((0.10 - 0.01 * n, 0, A_BOX))
        if image_id == 1:
            dets.append((0.05, 1, B_BOX))
        inputs.append({"image_id": image_id})
        outputs.append({"instances": _instances(dets)})
    return inputs, outputs


def _run(evaluator):
    evaluator.reset()
    inputs, outputs = _predictions()
    for inp, out in zip(inputs, outputs):
        evaluator.process([inp], [out])
    return evaluator.evaluate()["bbox"]


def test_fixed_ap_has_no_per_image_cap(registered):
    res = _run(FixedAPLVISEvaluator(registered, distributed=False, fixed_ap=True))
    # A: 903 detections, the 3 TPs ranked 901-903 -> interpolated precision 3/903 at every recall
    # level and IoU threshold. B: its only detection is a TP -> AP 100.
    ap_a, ap_b = 100 * 3 / 903, 100.0
    assert res["AP"] == pytest.approx((ap_a + ap_b) / 2, abs=1e-6)


def test_fixed_ap_top_k_is_per_category(registered):
    ev = FixedAPLVISEvaluator(registered, distributed=False, fixed_ap=True, fixed_ap_topk=902)
    res = _run(ev)
    # A keeps 902 of 903: the 0.08 TP is cut, recall stops at 2/3 -> precision 2/902 on the 67
    # recall thresholds 0.00..0.66, 0 on the rest. B keeps its single detection (a global top-902
    # would have dropped it, it has the lowest score).
    ap_a, ap_b = 100 * (67 / 101) * (2 / 902), 100.0
    assert res["AP"] == pytest.approx((ap_a + ap_b) / 2, abs=1e-6)


def test_periodic_pruning_gives_the_same_result(registered, monkeypatch):
    monkeypatch.setattr(lvis_module, "PRUNE_EVERY", 250)
    ev = FixedAPLVISEvaluator(registered, distributed=False, fixed_ap=True, fixed_ap_topk=902)
    res = _run(ev)
    assert sum(len(p["instances"]) for p in ev._predictions) == 902 + 1
    assert res["AP"] == pytest.approx((100 * (67 / 101) * (2 / 902) + 100.0) / 2, abs=1e-6)


def test_without_fixed_ap_it_is_the_parent(registered):
    res = _run(FixedAPLVISEvaluator(registered, distributed=False, fixed_ap=False))
    # The per-image cap of 300 keeps only false positives: every TP is dropped.
    assert res["AP"] == 0.0
    with _lvis_numpy_compat():
        parent = _run(LVISEvaluator(registered, distributed=False))
    assert parent == res


def test_keep_topk_per_category_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    preds, flat = [], []  # flat: (global position, score, class); x1 of each box = its position
    for image_id in range(4):
        n = int(torch.randint(0, 12, (1,), generator=g))
        dets = []
        for _ in range(n):
            score = float(torch.randint(0, 5, (1,), generator=g)) / 4  # many ties
            cls = int(torch.randint(0, 3, (1,), generator=g))
            pos = len(flat)
            flat.append((pos, score, cls))
            dets.append((score, cls, [pos, 0, pos + 1, 1]))
        preds.append({"image_id": image_id, "instances": _instances(dets)})
    kept = keep_topk_per_category(preds, topk=3)
    expected = set()
    for c in range(3):
        group = sorted((f for f in flat if f[2] == c), key=lambda f: (-f[1], f[0]))
        expected |= {f[0] for f in group[:3]}
    got = set()
    for p, q in zip(preds, kept):
        assert q["image_id"] == p["image_id"]
        got |= {int(x) for x in q["instances"].pred_boxes.tensor[:, 0]}
    assert got == expected
    assert sum(len(q["instances"]) for q in kept) == len(expected)


def test_bad_arguments(registered):
    with pytest.raises(ValueError, match="max_dets_per_image=300"):
        FixedAPLVISEvaluator(registered, fixed_ap=True, max_dets_per_image=300)
    with pytest.raises(ValueError, match="fixed_ap_topk"):
        FixedAPLVISEvaluator(registered, fixed_ap=True, fixed_ap_topk=0)


def test_bad_ground_truth_box_is_dropped_as_the_loader_does(tmp_path, caplog, registered):
    """A box outside its image is dropped from the LVIS ground truth (counted warning), so it is not
    scored as a miss; the image's other boxes stay."""
    json_file = tmp_path / "lvis_bad_box.json"
    _lvis_json(json_file)
    data = json.loads(json_file.read_text())
    data["annotations"].append(
        {"id": 5, "image_id": 2, "category_id": 2, "bbox": [2000.0, 5.0, 9.0, 9.0], "area": 81.0}
    )
    json_file.write_text(json.dumps(data))
    name = NAME + "_bad_box"
    DatasetCatalog.register(name, lambda: [{"image_id": i} for i in (1, 2, 3)])
    MetadataCatalog.get(name).set(json_file=str(json_file), evaluator_type="lvis")
    try:
        with caplog.at_level(logging.WARNING):
            ev = FixedAPLVISEvaluator(name, distributed=False, fixed_ap=False)
        assert "1 ground-truth box(es) dropped" in caplog.text and "2.jpg" in caplog.text
        assert sorted(a["id"] for a in ev._lvis_api.dataset["annotations"]) == [1, 2, 3, 4]
        clean = FixedAPLVISEvaluator(registered, distributed=False, fixed_ap=False)
        assert _run(ev)["AP"] == pytest.approx(_run(clean)["AP"])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_boxes_are_evaluated_as_the_original_reads_them(registered):
    """The original evaluates its legacy boxes scaled to the image, one pixel shorter on x2, y2 than
    the model's output: A's model box (10, 10, 68, 68) is read as (10, 10, 67, 67), IoU 2500 / 3249
    = 0.77 with the GT (a hit at 6 of the 10 IoU thresholds; as given, 2500 / 3364 = 0.74: 5)."""
    ev = FixedAPLVISEvaluator(registered, distributed=False, fixed_ap=True)
    ev.reset()
    for image_id in (1, 2, 3):
        dets = [(0.9, 0, [10.0, 10.0, 68.0, 68.0])]
        if image_id == 1:
            dets.append((0.8, 1, [100.0, 100.0, 151.0, 151.0]))  # read as B's GT exactly
        ev.process([{"image_id": image_id}], [{"instances": _instances(dets)}])
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx((60.0 + 100.0) / 2, abs=1e-6)
