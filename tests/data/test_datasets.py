"""Tests of dataset loading and registration on tiny files in the real on-disk formats."""

import itertools
import json
import logging

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

import fiber_d2.data  # noqa: F401  (registers the builtin datasets)
from fiber_d2.data.datasets import (
    load_captions,
    load_mdetr_json,
    mark_detection_dataset,
    register_captions,
    register_grounding_coco,
    register_mdetr_grounding,
)
from fiber_d2.data.datasets.common import BadRecordError
from fiber_d2.data.mapper import GroundingDatasetMapper
from fiber_d2.evaluation import FlickrRecallEvaluator

_ids = itertools.count()


def unique(name):
    return f"test_{name}_{next(_ids)}"


def write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return str(path)


def coco_json(tmp_path):
    return {
        "info": {"description": "tiny"},
        "images": [
            {"id": 10, "file_name": "a.jpg", "height": 100, "width": 120},
            {"id": 11, "file_name": "missing.jpg", "height": 50, "width": 60},
            {"id": 12, "file_name": "bad_box.jpg", "height": 50, "width": 60},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "bbox": [10, 20, 30, 40], "area": 1200, "category_id": 5,
             "iscrowd": 0},
            {"id": 2, "image_id": 10, "bbox": [0, 0, 50, 50], "area": 2500, "category_id": 9,
             "iscrowd": 1, "segmentation": {"counts": [2500], "size": [100, 120]}},
            {"id": 3, "image_id": 11, "bbox": [1, 1, 5, 5], "area": 25, "category_id": 1,
             "iscrowd": 0},
            {"id": 4, "image_id": 12, "bbox": [100, 80, 10, 10], "area": 100, "category_id": 1,
             "iscrowd": 0},
        ],
        "categories": [
            {"id": 1, "name": "café_table", "supercategory": "x"},
            {"id": 5, "name": "Äpfel (grün)", "supercategory": "x"},
            {"id": 9, "name": "人", "supercategory": "x"},
        ],
    }  # fmt: skip


def test_grounding_coco_loader(tmp_path, caplog, shapes_tokenizer):
    name = unique("coco")
    json_file = write(tmp_path / "instances.json", coco_json(tmp_path))
    Image.new("RGB", (120, 100)).save(tmp_path / "a.jpg")
    register_grounding_coco(name, json_file, str(tmp_path), prompt={"人": "person"})
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco" and meta.fiber_task == "detection"
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get(name)
    # the far-outside box is dropped with a counted warning naming the file, its image kept;
    # the missing image is only noticed by the mapper
    assert [r["image_id"] for r in records] == [10, 11, 12]
    assert records[2]["annotations"] == []
    assert "bad_box.jpg" in caplog.text and "dropped 1 bad annotation(s)" in caplog.text
    assert meta.thing_classes == ["café_table", "Äpfel (grün)", "人"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 5: 1, 9: 2}
    assert meta.category_prompts == {"人": "person"}
    first = records[0]
    assert first["task"] == "detection" and first["dataset_name"] == name
    assert [a["category_id"] for a in first["annotations"]] == [1, 2]
    assert [a["iscrowd"] for a in first["annotations"]] == [0, 1]
    assert first["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    # the mapper reads names from the metadata (prompt override applied), drops the crowd box
    # and skips the record whose image is missing
    mapper = GroundingDatasetMapper(
        is_train=True, augmentations=[], tokenizer=shapes_tokenizer, max_query_len=32,
        control_prob=(0, 0, 1, 0), shuffle_prompt=False,
    )  # fmt: skip
    out = mapper(records[0])
    assert out["caption"] == "café table. Äpfel . person"  # "Äpfel (grün)" -> "Äpfel "
    assert out["instances"].gt_classes.tolist() == [1]
    assert mapper(records[1]) is None and mapper.bad.skipped == 1


def test_grounding_coco_all_bad_raises(tmp_path):
    data = coco_json(tmp_path)
    data["images"] = [{"id": 12, "file_name": "no_size.jpg", "height": 0, "width": 0}]
    data["annotations"] = data["annotations"][3:]
    name = unique("coco_bad")
    register_grounding_coco(name, write(tmp_path / "bad.json", data), str(tmp_path))
    with pytest.raises(ValueError, match="no valid record"):
        DatasetCatalog.get(name)


FLICKR_CAPTION = "A man in a red shirt hugs his dog while the man smiles ."


def span_of(phrase, start=0):
    begin = FLICKR_CAPTION.index(phrase, start)
    return [begin, begin + len(phrase)]


MAN, SHIRT, DOG, THE_MAN = (
    span_of("A man"),
    span_of("a red shirt"),
    span_of("his dog"),
    span_of("the man"),
)


def flickr_json():
    caption = FLICKR_CAPTION
    return {
        "info": [],
        "licenses": [],
        "images": [
            {"file_name": "1000092795.jpg", "height": "333", "width": "500", "id": 0,
             "caption": caption, "dataset_name": "flickr", "tokens_negative": [[0, len(caption)]],
             "sentence_id": 0, "original_img_id": 1000092795,
             "tokens_positive_eval": [[MAN], [SHIRT], [DOG], [THE_MAN]]},
            {"file_name": "1000092795.jpg", "height": "333", "width": "500", "id": 1,
             "caption": "Two dogs", "dataset_name": "flickr", "tokens_negative": [[0, 8]],
             "sentence_id": 1, "original_img_id": 1000092795,
             "tokens_positive_eval": [[[0, 30]]]},
            {"file_name": "1000092795.jpg", "height": "333", "width": "500", "id": 2,
             "caption": " ", "dataset_name": "flickr", "tokens_negative": [[0, 1]],
             "sentence_id": 2, "original_img_id": 1000092795, "tokens_positive_eval": []},
        ],
        "annotations": [
            # one box shared by the coreferent phrases "A man" and "the man"
            {"area": 4000.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0,
             "bbox": [10.0, 20.0, 40.0, 100.0], "tokens_positive": [MAN, THE_MAN]},
            {"area": 800.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 1,
             "bbox": [15.0, 40.0, 20.0, 40.0], "tokens_positive": [SHIRT]},
            {"area": 600.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 2,
             "bbox": [300.0, 200.0, 30.0, 20.0], "tokens_positive": [DOG]},
            {"area": 900.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 3,
             "bbox": [340.0, 210.0, 30.0, 30.0], "tokens_positive": [DOG]},
            {"area": 10.0, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 4,
             "bbox": [1.0, 1.0, 2.0, 5.0], "tokens_positive": [[0, 8]]},
        ],
        "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
    }  # fmt: skip


def test_flickr_separate_gt_loader(tmp_path, caplog):
    name = unique("flickr")
    json_file = write(tmp_path / "final_flickr_separateGT_val.json", flickr_json())
    register_mdetr_grounding(name, json_file, str(tmp_path / "images"), "grounding")
    assert MetadataCatalog.get(name).evaluator_type == "flickr"
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get(name)
    assert len(records) == 1  # entry 1: eval span outside the caption; entry 2: empty caption
    assert "entry 1" in caplog.text and "entry 2" in caplog.text and "outside" in caplog.text
    r = records[0]
    assert r["file_name"] == str(tmp_path / "images" / "1000092795.jpg")
    assert (r["height"], r["width"], r["image_id"], r["original_image_id"]) == (
        333,
        500,
        0,
        1000092795,
    )
    assert r["task"] == "grounding" and r["sentence_id"] == 0
    assert [p["text"] for p in r["phrases"]] == ["A man", "a red shirt", "his dog", "the man"]
    assert [a["phrase_index"] for a in r["annotations"]] == [0, 1, 2, 2]
    assert all(a["category_id"] == 0 for a in r["annotations"])
    assert r["annotations"][0]["tokens_positive"] == [MAN, THE_MAN]
    # the shared box is GT of both coreferent phrases; xywh -> xyxy without -1
    assert r["phrases"][0]["boxes"] == [[10.0, 20.0, 50.0, 120.0]]
    assert r["phrases"][3]["boxes"] == [[10.0, 20.0, 50.0, 120.0]]
    assert r["phrases"][2]["boxes"] == [[300.0, 200.0, 330.0, 220.0], [340.0, 210.0, 370.0, 240.0]]


def refcoco_json():
    return {
        "images": [
            {"file_name": "COCO_train2014_000000581857.jpg", "height": 640, "width": 427,
             "id": 0, "original_id": 581857, "caption": "the lady with the blue shirt",
             "dataset_name": "refcoco", "tokens_negative": [[0, 8]]},
            {"file_name": "COCO_train2014_000000581857.jpg", "height": 640, "width": 427,
             "id": 1, "original_id": 581857, "caption": "lady in back",
             "dataset_name": "refcoco", "tokens_negative": [[0, 4]]},
        ],
        "annotations": [
            {"area": 9000.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0,
             "bbox": [103.9, 300.0, 130.5, 260.0], "tokens_positive": [[0, 8]],
             "original_id": 1},
            {"area": 9000.0, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 1,
             "bbox": [1.0, 2.0, 30.0, 40.0], "tokens_positive": [[0, 4]], "original_id": 2},
        ],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
    }  # fmt: skip


def test_refcoco_loader(tmp_path):
    records = load_mdetr_json(write(tmp_path / "r.json", refcoco_json()), "/img", "rc", "refexp")
    assert [r["caption"] for r in records] == ["the lady with the blue shirt", "lady in back"]
    r = records[0]
    assert r["task"] == "refexp" and r["original_image_id"] == 581857 and r["image_id"] == 0
    assert r["phrases"] == [
        {"text": "the lady", "tokens_positive": [[0, 8]],
         "boxes": [[103.9, 300.0, 234.4, 560.0]], "phrase_type": "unknown"}
    ]  # fmt: skip
    assert r["annotations"][0]["category_id"] == 0 and r["annotations"][0]["phrase_index"] == 0
    assert records[1]["image_id"] == 1


def test_an_annotation_overlapping_an_eval_phrase_joins_it(tmp_path):
    """An annotation whose span ("lady", 4..8) overlaps an eval phrase ("the lady", 0..8) without
    being equal to it is that phrase's box: no new phrase is added."""
    data = refcoco_json()
    data["images"][0]["tokens_positive_eval"] = [[[0, 8]]]
    data["annotations"][0]["tokens_positive"] = [[4, 8]]
    record, _ = load_mdetr_json(write(tmp_path / "o.json", data), "/img", "o", "grounding")
    assert [p["text"] for p in record["phrases"]] == ["the lady"]
    assert record["phrases"][0]["boxes"] == [[103.9, 300.0, 103.9 + 130.5, 300.0 + 260.0]]
    assert record["annotations"][0]["phrase_index"] == 0


def test_an_annotation_with_an_empty_span_is_dropped(tmp_path, caplog):
    """A span [4, 4) names no character: its annotation is dropped, the entry (with its other,
    valid annotation) kept."""
    data = refcoco_json()
    data["annotations"].append(dict(data["annotations"][0], id=9, tokens_positive=[[4, 4]]))
    with caplog.at_level(logging.WARNING):
        records = load_mdetr_json(write(tmp_path / "e.json", data), "/img", "e", "grounding")
    assert len(records) == 2 and len(records[0]["annotations"]) == 1
    assert [p["text"] for p in records[0]["phrases"]] == ["the lady"]
    assert "annotation 9" in caplog.text


def test_goldg_image_roots_and_new_phrases(tmp_path):
    data = refcoco_json()
    data["images"][0]["dataset_name"] = "gqa"
    data["images"][1]["dataset_name"] = "coco"
    data["annotations"].append(dict(data["annotations"][0], id=7, tokens_positive=[[18, 28]]))
    records = load_mdetr_json(
        write(tmp_path / "m.json", data), {"coco": "/coco", "*": "/gqa"}, "mixed", "grounding"
    )
    assert records[0]["file_name"].startswith("/gqa/") and records[1]["file_name"].startswith(
        "/coco/"
    )
    assert [p["text"] for p in records[0]["phrases"]] == ["the lady", "blue shirt"]
    assert [a["phrase_index"] for a in records[0]["annotations"]] == [0, 1]
    with pytest.raises(ValueError, match="task"):
        load_mdetr_json(str(tmp_path / "m.json"), "/x", "mixed", "detection")


def test_captions_jsonl(tmp_path, caplog):
    lines = [
        {"file_name": "a.jpg", "captions": ["a dog", " a dog ", "a brown dog", ""], "image_id": 7},
        {"file_name": "b.jpg", "caption": "a cat", "height": 20, "width": 30},
        {"file_name": "c.jpg", "captions": ["  "]},
    ]
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    with caplog.at_level(logging.WARNING):
        train = load_captions(str(path), "/root", "caps")
    # exact duplicates go; captions stay as written (" a dog " is not "a dog", as in the original)
    assert [(r["image_id"], r["caption"]) for r in train] == [
        (7, "a dog"),
        (7, " a dog "),
        (7, "a brown dog"),
        (1, "a cat"),
    ]
    assert train[3]["file_name"] == "/root/b.jpg" and train[3]["height"] == 20
    assert "height" not in train[0] and train[0]["task"] == "caption"
    assert "c.jpg" in caplog.text
    evaluation = load_captions(str(path), "/root", "caps", one_per_caption=False)
    assert [r["captions"] for r in evaluation] == [["a dog", " a dog ", "a brown dog"], ["a cat"]]


def test_captions_karpathy_and_coco(tmp_path):
    karpathy = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
             "split": "test", "cocoid": 391895, "sentids": [0, 1],
             "sentences": [{"tokens": ["a", "man"], "raw": "A man riding a bike.", "imgid": 0,
                            "sentid": 0},
                           {"tokens": ["a", "man"], "raw": "A man riding a bike.", "imgid": 0,
                            "sentid": 1}]},
            {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "imgid": 1,
             "split": "restval", "cocoid": 9, "sentids": [2],
             "sentences": [{"tokens": ["food"], "raw": "Food on a plate", "imgid": 1,
                            "sentid": 2}]},
        ],
    }  # fmt: skip
    name = unique("karpathy")
    register_captions(
        name, write(tmp_path / "dataset_coco.json", karpathy), "/coco", splits=["test"],
        one_per_caption=False,
    )  # fmt: skip
    assert MetadataCatalog.get(name).evaluator_type == "retrieval"
    (rec,) = DatasetCatalog.get(name)
    assert rec["file_name"] == "/coco/val2014/COCO_val2014_000000391895.jpg"
    assert rec["captions"] == ["A man riding a bike."] and rec["image_id"] == 391895
    coco = {
        "images": [{"id": 9, "file_name": "x.jpg", "height": 4, "width": 5}],
        "annotations": [{"image_id": 9, "id": 1, "caption": "A plate. "}],
    }
    (rec,) = load_captions(write(tmp_path / "captions_val2017.json", coco), "/v", "c")
    assert (rec["caption"], rec["image_id"], rec["width"]) == ("A plate. ", 9, 5)
    # a COCO captions file where a Karpathy split file belongs: no item has a split, so every
    # record was dropped ("no valid record (0 skipped)"); now said as such
    with pytest.raises(BadRecordError, match=r"no item of .*captions_val2017.json has a 'split'"):
        load_captions(str(tmp_path / "captions_val2017.json"), "/v", "c", splits=["train"])
    # two images of one id: both would get the captions of both
    coco["images"].append({"id": 9, "file_name": "y.jpg"})
    coco["annotations"].append({"image_id": 9, "id": 2, "caption": "A cup."})
    merged = write(tmp_path / "merged.json", coco)
    with pytest.raises(BadRecordError, match=r"merged.json: image id 9 is given to more than one "):
        load_captions(merged, "/v", "c")


def test_caption_files_of_the_wrong_shape_are_one_line(tmp_path, caplog):
    """Values of another json type than the format's were AttributeError tracebacks; one id for two
    Karpathy entries merged their reference captions; captions of an image id that 'images' does
    not list were dropped without a word."""
    entry = {"filepath": "val2014", "filename": "a.jpg", "cocoid": 5, "split": "test"}
    sentences = [{"raw": "A cat."}]
    karpathy = write(tmp_path / "k.json", {"images": [{**entry, "sentences": "A dog."}]})
    with pytest.raises(
        BadRecordError, match=r"k.json: 'images\[0\].sentences' must be a list, got"
    ):
        load_captions(karpathy, "/c", "k")
    twice = [
        {**entry, "sentences": sentences},
        {**entry, "filename": "b.jpg", "sentences": sentences},
    ]
    karpathy = write(tmp_path / "k.json", {"images": twice})
    with pytest.raises(BadRecordError, match=r"k.json: image id 5 is given to more than one image"):
        load_captions(karpathy, "/c", "k")
    coco = {"images": ["x.jpg"], "annotations": []}
    with pytest.raises(BadRecordError, match=r"c.json: images\[0\] must be a json object, got str"):
        load_captions(write(tmp_path / "c.json", coco), "/c", "c")
    coco = {"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": {"image_id": 1}}
    with pytest.raises(BadRecordError, match=r"c.json: 'annotations' must be a list, got a dict"):
        load_captions(write(tmp_path / "c.json", coco), "/c", "c")
    lines = tmp_path / "c.jsonl"
    lines.write_text(json.dumps({"file_name": "a.jpg", "caption": "a"}) + "\n" + '["b.jpg"]\n')
    with pytest.raises(
        BadRecordError, match=r"c.jsonl:2: a line must be one json object per image"
    ):
        load_captions(str(lines), "/c", "c")
    coco = {
        "images": [{"id": 1, "file_name": "x.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}],
    }
    with caplog.at_level(logging.WARNING):
        (record,) = load_captions(write(tmp_path / "c.json", coco), "/c", "c")
    assert record["caption"] == "a"
    assert "captions of 1 image id(s) that 'images' does not list are not used (first: '1')" in (
        caplog.text
    )


def test_a_value_of_another_json_type_is_one_line_naming_the_file(tmp_path):
    """An AttributeError from a reader (a string where the format has an object) was a traceback
    through load_records; now one line naming the dataset's file."""
    from fiber_d2.data.datasets.common import load_records

    name = unique("attribute_error")
    path = tmp_path / "odd.json"

    def load():
        return [record.get("file_name") for record in ["a.jpg"]]

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=str(path))
    with pytest.raises(BadRecordError) as err:
        load_records(name, "test")
    assert str(err.value) == (
        f"test dataset '{name}': cannot load its annotations: {path}: a value is not of the type the "
        "format requires ('str' object has no attribute 'get')"
    )


def test_mdetr_files_of_the_wrong_shape_are_one_line(tmp_path, caplog):
    image = {"id": 0, "file_name": "a.jpg", "height": 10, "width": 10, "caption": "a dog"}
    for data, message in [
        (["images"], r"m.json: no 'images' list"),
        ({"images": {"0": image}}, r"m.json: 'images' must be a list, got a dict"),
        ({"images": [image, "b.jpg"]}, r"m.json: images\[1\] must be a json object, got str"),
        ({"images": [image], "annotations": [3]}, r"m.json: annotations\[0\] must be a json"),
    ]:
        with pytest.raises((BadRecordError, KeyError), match=message):
            load_mdetr_json(write(tmp_path / "m.json", data), "/x", "m", "grounding")
    box = {"id": 1, "image_id": 0, "bbox": [1, 1, 4, 4], "tokens_positive": [[0, 5]]}
    boxes = [box, {**box, "id": 2, "image_id": 7}]
    with caplog.at_level(logging.WARNING):
        (record,) = load_mdetr_json(
            write(tmp_path / "m.json", {"images": [image], "annotations": boxes}), "/x", "m",
            "grounding",
        )  # fmt: skip
    assert len(record["annotations"]) == 1
    assert "boxes of 1 image id(s) that 'images' does not list are not used (first: 7)" in (
        caplog.text
    )


def test_builtin_registrations():
    expected = {
        "flickr30k_separateGT_val": ("flickr", "final_flickr_separateGT_val.json"),
        "refcocog_test": ("refexp", "finetune_refcocog_test.json"),
        "refcoco+_testB": ("refexp", "finetune_refcoco+_testB.json"),
        "mixed_train_no_coco": ("flickr", "final_mixed_train_no_coco.json"),
        "objects365_train": ("coco", "objects365_train.json"),
        "lvis_v1_minival": ("lvis", "lvis_v1_minival_inserted_image_name.json"),
        "coco_caption_karpathy_test": ("retrieval", "dataset_coco.json"),
        "shapes_train_det": ("coco", "det_train.json"),
        "shapes_val_grounding": ("flickr", "grounding_val.json"),
        "shapes_val_refexp": ("refexp", "refexp_val.json"),
        "shapes_val_captions": ("retrieval", "captions_val.jsonl"),
    }
    for name, (evaluator, file_name) in expected.items():
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == evaluator, name
        assert meta.json_file.endswith(file_name), name
    for name in ("coco_2017_train", "coco_2017_val", "lvis_v1_val", "lvis_v1_minival"):
        assert MetadataCatalog.get(name).fiber_task == "detection"
        assert getattr(DatasetCatalog[name], "_fiber_marked", False)
    assert len(MetadataCatalog.get("shapes_val_det").thing_classes) == 12


def test_mark_detection_dataset_wraps_the_loader():
    name = unique("plain")
    record = {"file_name": "x.jpg", "height": 10, "width": 10, "image_id": 1,
              "annotations": [{"bbox": [1, 1, 3, 3], "bbox_mode": BoxMode.XYWH_ABS,
                               "category_id": 0}]}  # fmt: skip
    DatasetCatalog.register(name, lambda: [dict(record)])
    assert mark_detection_dataset(name, prompt={"a": "b"})
    assert mark_detection_dataset(name)  # idempotent: not wrapped twice
    (out,) = DatasetCatalog.get(name)
    assert out["task"] == "detection" and out["dataset_name"] == name
    assert not mark_detection_dataset(unique("absent"))


def test_flickr_phrase_types_are_names_and_keys(tmp_path):
    """MDETR's per-phrase type lists become names, so the evaluator's keys read R@1-clothing."""
    data = flickr_json()
    data["images"][0]["phrase_types"] = [["people"], ["clothing"], ["animals"], ["people"]]
    name = unique("flickr_types")
    register_mdetr_grounding(name, write(tmp_path / "f.json", data), str(tmp_path), "grounding")
    record = DatasetCatalog.get(name)[0]
    assert [p["phrase_type"] for p in record["phrases"]] == [
        "people",
        "clothing",
        "animals",
        "people",
    ]
    ev = FlickrRecallEvaluator(name, distributed=False)
    inst = Instances((333, 500))
    inst.pred_boxes = Boxes(torch.zeros(0, 4))
    inst.scores = torch.zeros(0)
    inst.pred_classes = torch.zeros(0, dtype=torch.long)
    ev.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    keys = set(ev.evaluate()["grounding"])
    assert {"R@1-clothing", "R@1-people", "R@1-animals"} <= keys
    assert not any("[" in k or "'" in k for k in keys)


def test_training_on_a_per_image_caption_set_is_one_line(tmp_path):
    """A per-image caption registration (an evaluation split) in DATASETS.TRAIN would reach the
    model as (K, T) captions without MLM inputs; the pre-run check names it instead."""
    from fiber_d2.data.datasets.common import BadRecordError, check_datasets_before_run

    path = tmp_path / "caps.jsonl"
    path.write_text(json.dumps({"file_name": "a.jpg", "captions": ["a dog", "a cat"]}) + "\n")
    per_image = unique("per_image")
    register_captions(per_image, str(path), str(tmp_path), one_per_caption=False)
    with pytest.raises(
        BadRecordError, match=f"training dataset '{per_image}' holds one record per"
    ):
        check_datasets_before_run([per_image], [])
    per_caption = unique("per_caption")
    register_captions(per_caption, str(path), str(tmp_path))
    with pytest.raises(BadRecordError, match=r"1 image file\(s\) not found, first .*a.jpg"):
        check_datasets_before_run([per_caption], [])  # past the check, to the image test


def test_lvis_categories_are_prompted_by_their_annotation_name():
    """The original prompts LVIS categories by the json's ``name``; detectron2's class names are
    the first synonyms, which differ once (id 162: "bull" / "horned_cow")."""
    from fiber_d2.data.mapper import GroundingDatasetMapper
    from fiber_d2.engine.setup import load_config
    from fiber_d2.text import clean_name

    mapper = GroundingDatasetMapper(load_config("configs/Demo/fine_tiny.yaml"), is_train=False)
    for name in ("lvis_v1_train", "lvis_v1_val", "lvis_v1_minival", "lvis_v1_od_val"):
        classes = MetadataCatalog.get(name).thing_classes
        names = mapper.category_names(name)
        assert classes[161] == "horned_cow" and names[161] == "bull", name
        assert [n for i, n in enumerate(names) if i != 161] == [
            clean_name(n) for i, n in enumerate(classes) if i != 161
        ]


def test_training_images_are_filtered_as_the_original_filters_them(tmp_path):
    """maskrcnn-benchmark's rule, through ``FIBERTrainer.train_records``: an image with only crowd
    boxes is kept (a negative once the mapper drops them) and one whose boxes are all at most 1 px
    wide or tall is removed; detectron2's ``filter_empty`` does the reverse. Images without
    annotations are removed by both."""
    from fiber_d2.data.datasets.common import filter_training_images
    from fiber_d2.engine.setup import load_config
    from fiber_d2.engine.trainer import FIBERTrainer

    def record(image_id, *boxes):
        annotations = [
            {"bbox": list(b), "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": c}
            for *b, c in boxes
        ]
        return {"image_id": image_id, "file_name": f"{image_id}.jpg", "annotations": annotations}

    records = [
        record("normal", (5, 5, 20, 20, 0)),
        record("crowd_only", (5, 5, 20, 20, 1)),
        record("tiny_only", (5, 5, 1, 20, 0), (9, 9, 30, 0.5, 0)),
        record("none"),
        record("tiny_and_normal", (5, 5, 1, 20, 0), (9, 9, 30, 4, 0)),
    ]
    kept = [r["image_id"] for r in filter_training_images(records)]
    assert kept == ["normal", "crowd_only", "tiny_and_normal"]
    assert filter_training_images([{"image_id": 1, "caption": "a"}]) == [
        {"image_id": 1, "caption": "a"}
    ]  # captions carry no annotations

    name = "filter_like_the_original"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(thing_classes=["thing"])
    cfg = load_config("configs/Demo/fine_tiny.yaml", ["DATASETS.TRAIN", f"('{name}',)"])
    assert [r["image_id"] for r in FIBERTrainer.train_records(cfg)] == kept
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    assert len(FIBERTrainer.train_records(cfg)) == 5


def test_a_box_of_three_numbers_is_dropped_with_its_image_kept(caplog):
    """detectron2's BoxMode.convert asserts on a box of 3 numbers: that was a traceback."""
    from detectron2.structures import BoxMode

    from fiber_d2.data.datasets.detection import finish_detection_records

    good = {"bbox": [1, 1, 4, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    bad = dict(good, bbox=[1, 1, 4])
    record = {"file_name": "a.png", "image_id": 1, "height": 10, "width": 10}
    with caplog.at_level("WARNING"):
        kept = finish_detection_records([dict(record, annotations=[good, bad])], "three", "a.json")
    assert len(kept) == 1 and kept[0]["annotations"] == [good]
    assert "unusable bbox [1, 1, 4]" in caplog.text


@pytest.mark.parametrize(
    "xyxy, reason",
    [
        ([1, 1, 4, 4], None),
        ([-5, -5, 0.5, 0.5], None),  # partly inside: kept, the mapper clips it
        ([1, 1, 4], "box [1, 1, 4] is not 4 finite numbers"),
        ([1, float("nan"), 4, 4], "box [1, nan, 4, 4] is not 4 finite numbers"),
        ([1, 1, float("inf"), 4], "box [1, 1, inf, 4] is not 4 finite numbers"),
        ([4, 1, 4, 5], "box [4.0, 1.0, 4.0, 5.0] has a non-positive width or height"),
        ([1, 5, 4, 2], "box [1.0, 5.0, 4.0, 2.0] has a non-positive width or height"),
        ([-3, 1, 0, 4], "box [-3.0, 1.0, 0.0, 4.0] lies outside the 10x8 image"),
        ([10, 1, 12, 4], "box [10.0, 1.0, 12.0, 4.0] lies outside the 10x8 image"),
        ([1, 8, 4, 9], "box [1.0, 8.0, 4.0, 9.0] lies outside the 10x8 image"),
    ],
)
def test_box_problem(xyxy, reason):
    from fiber_d2.data.datasets.common import box_problem

    assert box_problem(xyxy, 10, 8) == reason


@pytest.mark.parametrize(
    "spans, reason",
    [
        ([[0, 3], [4, 9]], None),
        ([], "no char span ([])"),
        (None, "no char span (None)"),
        ([[0, 3, 5]], "span [0, 3, 5] is not a [start, end) pair"),
        ([3], "span 3 is not a [start, end) pair"),
        ([[3, 3]], "span [3, 3] is outside the caption (length 9)"),
        ([[-1, 2]], "span [-1, 2] is outside the caption (length 9)"),
        ([[4, 10]], "span [4, 10] is outside the caption (length 9)"),
        ([[0.0, 2]], "span [0.0, 2] is outside the caption (length 9)"),
    ],
)
def test_span_problem(spans, reason):
    from fiber_d2.data.datasets.common import span_problem

    assert span_problem(spans, "a red box") == reason
