"""build_evaluator: dispatch on evaluator_type, clear errors, and the COCO path end to end."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fiber_d2.config import add_fiber_config
from fiber_d2.evaluation import (
    FixedAPLVISEvaluator,
    FlickrRecallEvaluator,
    RefExpEvaluator,
    RetrievalEvaluator,
    build_evaluator,
)

PREFIX = "fiber_test_build_eval_"
# COCO GT (xyxy): category ids 3 and 7 (not contiguous) -> contiguous 0 and 1.
GT = {
    1: [(3, [10, 10, 60, 80]), (7, [100, 100, 180, 150])],
    2: [(3, [20, 30, 90, 70])],
    3: [(7, [5, 5, 45, 95]), (7, [50, 60, 150, 160])],
}
CONTIGUOUS = {3: 0, 7: 1}


@pytest.fixture()
def cfg():
    c = get_cfg()
    add_fiber_config(c)
    return c


@pytest.fixture()
def names():
    registered = []

    def register(suffix, **metadata):
        name = PREFIX + suffix
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(**metadata)
        registered.append(name)
        return name

    yield register
    for name in registered:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture()
def coco_dataset(tmp_path):
    images = [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in GT]
    anns = []
    for image_id, objs in GT.items():
        for cat, (x1, y1, x2, y2) in objs:
            w, h = x2 - x1, y2 - y1
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    path = tmp_path / "coco_tiny.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    name = PREFIX + "coco"
    register_coco_instances(name, {}, str(path), str(tmp_path))
    DatasetCatalog.get(name)  # as the data loader does: sets the contiguous id mapping
    yield name, str(path)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _instances(dets):
    """dets: list of (score, contiguous class, xyxy)."""
    inst = Instances((200, 200))
    inst.scores = torch.tensor([d[0] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([d[1] for d in dets], dtype=torch.long)
    inst.pred_boxes = Boxes(torch.tensor([d[2] for d in dets], dtype=torch.float32).reshape(-1, 4))
    return inst


def _evaluate_coco(evaluator, dets_per_image):
    evaluator.reset()
    for image_id, dets in dets_per_image.items():
        evaluator.process([{"image_id": image_id}], [{"instances": _instances(dets)}])
    return evaluator.evaluate()["bbox"]


def test_coco_perfect_predictions_give_ap_100(cfg, coco_dataset):
    name, _ = coco_dataset
    evaluator = build_evaluator(cfg, name)
    assert isinstance(evaluator, COCOEvaluator)
    perfect = {i: [(0.9, CONTIGUOUS[c], box) for c, box in objs] for i, objs in GT.items()}
    res = _evaluate_coco(evaluator, perfect)
    assert res["AP"] == pytest.approx(100.0)
    assert res["AP50"] == pytest.approx(100.0)


def test_coco_matches_pycocotools_directly(cfg, coco_dataset, tmp_path):
    name, json_file = coco_dataset
    dets = {
        1: [(0.9, 0, [12, 10, 60, 84]), (0.8, 1, [100, 100, 180, 150]), (0.7, 0, [0, 0, 30, 30])],
        2: [(0.6, 0, [30, 30, 90, 70]), (0.95, 1, [20, 30, 90, 70])],
        3: [(0.5, 1, [5, 5, 45, 80]), (0.4, 1, [60, 60, 150, 170])],
    }
    res = _evaluate_coco(build_evaluator(cfg, name, output_folder=str(tmp_path / "out")), dets)

    # Reference: pycocotools on the same detections, converted here (xywh, dataset ids).
    inverse = {v: k for k, v in CONTIGUOUS.items()}
    coco_dets = [
        {
            "image_id": i,
            "category_id": inverse[c],
            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            "score": s,
        }
        for i, ds in dets.items()
        for s, c, b in ds
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        ev = COCOeval(gt, gt.loadRes(coco_dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert 0.0 < res["AP"] < 100.0
    np.testing.assert_allclose(
        [res["AP"], res["AP50"], res["AP75"]], 100 * ev.stats[:3], rtol=0, atol=1e-6
    )
    assert (tmp_path / "out" / "coco_instances_results.json").exists()


def test_dispatch_on_evaluator_type(cfg, names, tmp_path):
    cfg.TEST.FIXED_AP = True
    cfg.TEST.FIXED_AP_TOPK = 123
    cfg.TEST.FLICKR_GT_TYPE = "merged"
    lvis_json = tmp_path / "lvis.json"
    lvis_json.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    lvis = build_evaluator(cfg, names("lvis", evaluator_type="lvis", json_file=str(lvis_json)))
    assert isinstance(lvis, FixedAPLVISEvaluator)
    assert lvis._fixed_ap and lvis._fixed_ap_topk == 123 and lvis._max_dets_per_image == -1
    flickr = build_evaluator(cfg, names("flickr", evaluator_type="flickr"), output_folder="o")
    assert isinstance(flickr, FlickrRecallEvaluator)
    assert flickr._gt_type == "merged" and flickr._output_dir == "o"
    assert isinstance(build_evaluator(cfg, names("ref", evaluator_type="refexp")), RefExpEvaluator)
    retrieval = build_evaluator(cfg, names("ret", evaluator_type="retrieval"))
    assert isinstance(retrieval, RetrievalEvaluator)


def test_clear_errors(cfg, names):
    with pytest.raises(KeyError, match="'fiber_no_such_set' is not registered"):
        build_evaluator(cfg, "fiber_no_such_set")
    with pytest.raises(ValueError, match="unknown evaluator_type 'sem_seg'"):
        build_evaluator(cfg, names("semseg", evaluator_type="sem_seg"))
    with pytest.raises(KeyError, match="has no evaluator_type"):
        build_evaluator(cfg, names("untyped"))
