"""Every evaluator checks that each record of its dataset was evaluated exactly once, in one process
and across two gloo processes (duplicates on one rank or on two, gaps, ids not in the dataset)."""

import json
import logging
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from two_ranks import run_two_ranks

from fiber_d2.data.datasets.common import BadRecordError
from fiber_d2.evaluation import EvaluationCoverageError
from fiber_d2.evaluation.coco import FIBERCOCOEvaluator
from fiber_d2.evaluation.flickr import FlickrRecallEvaluator
from fiber_d2.evaluation.lvis import FixedAPLVISEvaluator
from fiber_d2.evaluation.refexp import RefExpEvaluator
from fiber_d2.evaluation.retrieval import RetrievalEvaluator

IDS = [1, 2, 3, 4]
BOX = [10.0, 10.0, 40.0, 40.0]
KINDS = ("coco", "lvis", "flickr", "refexp", "retrieval")
# scenario -> ids processed by (rank 0, rank 1); in one process the two lists are concatenated
SCENARIOS = {
    "once": ([1, 2], [3, 4]),
    "duplicate_on_one_rank": ([1, 2, 2], [3, 4]),
    "duplicate_across_ranks": ([1, 2], [2, 3, 4]),
    "gap": ([1], [3, 4]),
    "unknown_id": ([1, 2], [3, 4, 77]),
}
EXPECTED = {
    "once": None,
    "duplicate_on_one_rank": "1 evaluated more than once (image_id 2)",
    "duplicate_across_ranks": "1 evaluated more than once (image_id 2)",
    "gap": "1 never evaluated (image_id 2)",
    "unknown_id": "1 not in the dataset (image_id 77)",
}


def _coco_json(path, bad_box=False, repeated_image=False):
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in IDS]
    if repeated_image:  # a fifth image with image 3's id
        images.append({"id": 3, "width": 100, "height": 100, "file_name": "5.jpg"})
    xywh = [BOX[0], BOX[1], BOX[2] - BOX[0], BOX[3] - BOX[1]]
    anns = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": xywh, "area": 900.0, "iscrowd": 0}
        for i in IDS
    ]
    if bad_box:  # a box outside image 1: dropped by the loaders and by the evaluator alike
        anns.append(
            {"id": 99, "image_id": 1, "category_id": 1, "bbox": [300, 300, 10, 10], "area": 100.0}
        )
    for img in images:
        img.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    cats = [{"id": 1, "name": "thing", "frequency": "f", "image_count": 4}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


def register(folder, suffix=""):
    """Register one tiny dataset per evaluator kind; returns {kind: name}."""
    names = {k: f"xo_{k}{suffix}" for k in KINDS}
    phrase = {"text": "a box", "tokens_positive": [[0, 5]], "boxes": [BOX], "phrase_type": "x"}
    records = {
        "coco": [{"image_id": i} for i in IDS],
        "lvis": [{"image_id": i} for i in IDS],
        "flickr": [{"image_id": i, "caption": "a box", "phrases": [phrase]} for i in IDS],
        "refexp": [{"image_id": i, "caption": "a box", "phrases": [phrase]} for i in IDS],
        "retrieval": [{"image_id": i, "captions": ["a", "b"]} for i in IDS],
    }
    for kind, name in names.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda r=records[kind]: r)
        meta = {"evaluator_type": kind}
        if kind in ("coco", "lvis"):
            meta.update(
                json_file=_coco_json(folder / f"{kind}.json"),
                thing_classes=["thing"],
                thing_dataset_id_to_contiguous_id={1: 0},
            )
        MetadataCatalog.get(name).set(**meta)
    return names


def build(kind, name, distributed):
    if kind == "coco":
        return FIBERCOCOEvaluator(name, tasks=("bbox",), distributed=distributed)
    if kind == "lvis":
        return FixedAPLVISEvaluator(name, distributed=distributed)
    cls = {"flickr": FlickrRecallEvaluator, "refexp": RefExpEvaluator}.get(kind, RetrievalEvaluator)
    return cls(name, distributed=distributed)


def output(kind, image_id):
    if kind == "retrieval":
        v = torch.zeros(4)
        v[image_id % 4] = 1.0
        return {"image_embedding": v, "text_embeddings": torch.stack([v, v])}
    inst = Instances((100, 100))
    inst.pred_boxes = Boxes(torch.tensor([BOX]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([0])
    return {"instances": inst}


def evaluate(kind, name, ids, distributed):
    """'ok' or the error's message."""
    ev = build(kind, name, distributed)
    ev.reset()
    for i in ids:
        ev.process([{"image_id": i}], [output(kind, i)])
    try:
        ev.evaluate()
    except EvaluationCoverageError as e:
        return str(e)
    return "ok"


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    return register(tmp_path_factory.mktemp("xo"))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("kind", KINDS)
def test_one_process(names, kind, scenario):
    ids = SCENARIOS[scenario][0] + SCENARIOS[scenario][1]
    result = evaluate(kind, names[kind], ids, distributed=False)
    if EXPECTED[scenario] is None:
        assert result == "ok"
    else:
        assert EXPECTED[scenario] in result and names[kind] in result
        assert "\n" not in result


def _ranked_evaluations(rank, folder):
    # each rank writes its own copy of the annotation files: two processes writing one file while
    # the other reads it would race
    own = Path(folder) / f"data{rank}"
    own.mkdir()
    names = register(own, suffix="_ddp")
    results = {}
    for kind in KINDS:
        for scenario, per_rank in SCENARIOS.items():
            results[f"{kind}/{scenario}"] = evaluate(
                kind, names[kind], per_rank[rank], distributed=True
            )
    return results


@pytest.mark.long(0.5)
def test_two_processes(tmp_path):
    ranks = run_two_ranks(_ranked_evaluations, tmp_path, str(tmp_path))
    for kind in KINDS:
        for scenario, expected in EXPECTED.items():
            key = f"{kind}/{scenario}"
            for rank in ranks:  # every rank reaches the same verdict
                if expected is None:
                    assert rank[key] == "ok", key
                else:
                    assert expected in rank[key], (key, rank[key])


def test_unreadable_image_counts_without_predictions(tmp_path):
    names = register(tmp_path, suffix="_unreadable")
    ev = build("coco", names["coco"], distributed=False)
    ev.reset()
    for i in IDS:
        ev.process([{"image_id": i, "unreadable": i == 4}], [output("coco", i)])
    ap = ev.evaluate()["bbox"]["AP50"]
    assert ap == pytest.approx(75.0, abs=0.5)  # 3 of 4 GT boxes found; image 4 still counts


def test_coco_ground_truth_drops_the_boxes_the_loader_drops(tmp_path, caplog):
    name = "xo_coco_bad_box"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [{"image_id": i} for i in IDS])
    MetadataCatalog.get(name).set(
        json_file=_coco_json(tmp_path / "bad.json", bad_box=True),
        thing_classes=["thing"],
        thing_dataset_id_to_contiguous_id={1: 0},
    )
    ev = FIBERCOCOEvaluator(name, tasks=("bbox",), distributed=False)
    assert "1 ground-truth box(es) dropped" in caplog.text and "1.jpg" in caplog.text
    ev.reset()
    for i in IDS:
        ev.process([{"image_id": i}], [output("coco", i)])
    assert ev.evaluate()["bbox"]["AP50"] == pytest.approx(100.0)


@pytest.mark.parametrize("kind", ["coco", "lvis"])
def test_ground_truth_with_one_id_for_two_images(kind, tmp_path):
    """pycocotools and the LVIS API keep the last image of an id, with the boxes of both: the
    scores silently read one image's boxes on another. Now one line naming the file and the id."""
    name = f"xo_{kind}_repeated_image"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [{"image_id": i} for i in IDS])
    json_file = _coco_json(tmp_path / "repeated.json", repeated_image=True)
    MetadataCatalog.get(name).set(
        json_file=json_file, thing_classes=["thing"], thing_dataset_id_to_contiguous_id={1: 0}
    )
    with pytest.raises(BadRecordError) as err:
        build(kind, name, distributed=False)
    assert str(err.value) == (
        f"{json_file}: image id 3 is given to more than one image (3.jpg and 5.jpg); each image "
        "needs its own id"
    )
    MetadataCatalog.remove(name)  # the control: the same file without the repeat evaluates
    MetadataCatalog.get(name).set(
        json_file=_coco_json(tmp_path / "once.json"),
        thing_classes=["thing"],
        thing_dataset_id_to_contiguous_id={1: 0},
    )
    assert evaluate(kind, name, IDS, distributed=False) == "ok"


def test_metrics_files_appear_whole(tmp_path, monkeypatch):
    """An evaluator's metrics file was written in place: a run killed (or a disk full) in the middle
    left a truncated file. Now it appears whole or not at all, and an earlier one stays."""
    import json

    import fiber_d2.evaluation.integrity as integrity

    integrity.write_metrics({"AP": 1.0}, str(tmp_path), "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"AP": 1.0}

    def dies_midway(obj, f, **kwargs):
        f.write('{"AP": ')
        raise KeyboardInterrupt  # a kill, as far as the writer can tell

    monkeypatch.setattr(integrity.json, "dump", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        integrity.write_metrics({"AP": 2.0}, str(tmp_path), "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"AP": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_a_dataset_giving_one_id_to_two_records_is_said_so():
    """A dataset that repeats a record id read "(3 records): 1 evaluated more than once" for its
    four records: the evaluation was blamed for the dataset."""
    from fiber_d2.evaluation.integrity import check_exactly_once

    with pytest.raises(EvaluationCoverageError) as err:
        check_exactly_once("d", [1, 2, 2, 3], [1, 2, 2, 3], "X", key="question_id")
    assert str(err.value) == (
        "X on 'd' (4 records): the dataset gives 1 question_id(s) to more than one record "
        "(question_id 2); each record needs its own"
    )


def test_boxes_of_an_unlisted_image_are_named_as_such(caplog):
    """A ground-truth box whose image id 'images' does not list was reported as "not finite, empty
    or outside the image" and dropped; COCOeval never reads it, so it is kept and named."""
    import logging

    from fiber_d2.evaluation.coco import drop_bad_gt_boxes

    images = {1: {"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"}}
    boxes = [{"image_id": 1, "bbox": BOX}, {"image_id": 99, "bbox": BOX}]
    dataset = {"annotations": list(boxes)}
    with caplog.at_level(logging.WARNING):
        assert not drop_bad_gt_boxes(dataset, images, "d")
    assert dataset["annotations"] == boxes
    assert "d: 1 ground-truth box(es) name an image id that 'images' does not list (first: 99)" in (
        caplog.text
    )
    assert "outside the image" not in caplog.text


def test_ground_truth_boxes_are_read_as_coco_xywh():
    """A json box is [x, y, width, height] (COCO format): [50, 50, 10, 10] is the 10-pixel square at
    (50, 50) and is kept, though read as corners it would be empty; a zero width or a box right of
    the 100-pixel image is dropped."""
    from fiber_d2.evaluation.coco import drop_bad_gt_boxes

    images = {1: {"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"}}
    small = {"image_id": 1, "bbox": [50, 50, 10, 10]}
    corner = {"image_id": 1, "bbox": [0, 0, 100, 100]}  # the whole image
    flat = {"image_id": 1, "bbox": [50, 50, 0, 10]}
    outside = {"image_id": 1, "bbox": [100, 10, 5, 5]}
    dataset = {"annotations": [small, flat, corner, outside]}
    assert drop_bad_gt_boxes(dataset, images, "d")
    assert dataset["annotations"] == [small, corner]


def test_metrics_files_are_strict_json_for_infinities_and_scalars(tmp_path):
    """NaN and +/- infinity are written as null, and 0-d numpy / torch scalars (COCO's and LVIS's
    metrics are numpy floats) as plain numbers, so the file is strict JSON."""
    import numpy as np

    import fiber_d2.evaluation.integrity as integrity

    metrics = {
        "bbox": {"AP": np.float32(0.5), "AR": torch.tensor(0.25), "n": np.int64(3)},
        "odd": {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")},
    }
    result = integrity.write_metrics(metrics, str(tmp_path), "m.json")
    assert result["bbox"]["n"] == 3
    assert json.loads((tmp_path / "m.json").read_text()) == {
        "bbox": {"AP": 0.5, "AR": 0.25, "n": 3},
        "odd": {"nan": None, "inf": None, "-inf": None},
    }


def test_seen_records_of_unregistered_or_keyless_datasets(caplog):
    """Ids of mixed types are listed in a stable order, at most five and then the count; a dataset
    that is not registered checks duplicates only (with a warning); a registered one whose records
    lack the key is named."""
    from fiber_d2.evaluation.integrity import SeenRecords, check_exactly_once, dataset_record_ids

    with pytest.raises(EvaluationCoverageError) as err:
        check_exactly_once("d", [], [3, "b", 1, "a", 2, 7], "X")
    assert str(err.value) == (
        "X on 'd' (6 records): 6 never evaluated (image_id 1, 2, 3, 7, a, ... (6 in all))"
    )

    seen = SeenRecords("never_registered_xyz", "X", distributed=False)
    seen.add(1)
    seen.add(2)
    with caplog.at_level(logging.WARNING):
        seen.check()  # nothing to compare with: no gap can be found, and no duplicate is there
    assert "dataset 'never_registered_xyz' is not registered; only duplicates are checked" in (
        caplog.text
    )
    seen.add(2)
    with pytest.raises(
        EvaluationCoverageError, match="1 evaluated more than once \\(image_id 2\\)"
    ):
        seen.check()
    with pytest.raises(KeyError, match="'never_registered_xyz' is not registered"):
        dataset_record_ids("never_registered_xyz")

    name = "exactly_once_keyless"
    DatasetCatalog.register(name, lambda: [{"image_id": 1}, {"file_name": "x.jpg"}])
    try:
        with pytest.raises(KeyError, match=f"dataset '{name}': a record has no 'image_id'"):
            dataset_record_ids(name)
    finally:
        DatasetCatalog.remove(name)
