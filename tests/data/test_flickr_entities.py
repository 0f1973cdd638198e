"""Flickr30k evaluation ground truth from the Entities files (fine spec §5.1), on a hand-made image:
its Sentences / Annotations files and the MDETR json its conversion gives (which keeps one of two
boxes of IoU >= 0.95 and has no phrase types)."""

import json
import logging

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from fiber_d2.data.datasets.builtin import _flickr_ground_truth, register_flickr30k
from fiber_d2.data.datasets.flickr_entities import (
    entities_ground_truth,
    read_entity_boxes,
    read_sentences,
)
from fiber_d2.evaluation.flickr import FlickrRecallEvaluator

SENTENCES = (
    "[/EN#1/people A man] in [/EN#2/clothing a blue shirt] holds [/EN#3/animals/other a dog] in"
    " [/EN#4/scene the park] .\n"
    "[/EN#2/clothing The shirt] is blue .\n"
)
DOG_A, DOG_B = [0, 0, 100, 100], [0, 0, 100, 97]  # IoU 0.97: MDETR's json keeps the last, B
XML = f"""<annotation><filename>42.jpg</filename>
<size><width>200</width><height>200</height><depth>3</depth></size>
<object><name>1</name><bndbox><xmin>110</xmin><ymin>10</ymin><xmax>150</xmax><ymax>90</ymax></bndbox></object>
<object><name>2</name><bndbox><xmin>112</xmin><ymin>30</ymin><xmax>148</xmax><ymax>60</ymax></bndbox></object>
<object><name>3</name><bndbox><xmin>{DOG_A[0]}</xmin><ymin>{DOG_A[1]}</ymin><xmax>{DOG_A[2]}</xmax><ymax>{DOG_A[3]}</ymax></bndbox></object>
<object><name>3</name><bndbox><xmin>{DOG_B[0]}</xmin><ymin>{DOG_B[1]}</ymin><xmax>{DOG_B[2]}</xmax><ymax>{DOG_B[3]}</ymax></bndbox></object>
<object><name>4</name><nobndbox>1</nobndbox><scene>1</scene></object>
</annotation>
"""


def _xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def _mdetr_json():
    """What MDETR's conversion writes for the two sentences."""
    first = "A man in a blue shirt holds a dog in the park ."
    man, shirt, dog = (first.index(w) for w in ("A man", "a blue shirt", "a dog"))
    spans = [[man, man + 5]], [[shirt, shirt + 12]], [[dog, dog + 5]]
    image = {"file_name": "42.jpg", "height": 200, "width": 200, "original_img_id": 42}
    images = [
        {**image, "id": 0, "sentence_id": 0, "caption": first, "tokens_positive_eval": spans},
        {
            **image,
            "id": 1,
            "sentence_id": 1,
            "caption": "The shirt is blue .",
            "tokens_positive_eval": [[[0, 9]]],
        },
    ]
    boxes = [[110, 10, 150, 90], [112, 30, 148, 60], DOG_B]
    anns = [
        {"id": k, "image_id": 0, "bbox": _xywh(b), "tokens_positive": s, "category_id": 1}
        for k, (b, s) in enumerate(zip(boxes, spans))
    ]
    anns.append(
        {"id": 3, "image_id": 1, "bbox": _xywh(boxes[1]), "tokens_positive": [[0, 9]]}
        | {"category_id": 1}
    )
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


PREFIX = "fiber_test_f30k"


@pytest.fixture
def flickr(tmp_path):
    """A datasets root with MDETR's val json and the Entities folder, registered by the builtin
    registration; ``names``: the val set (Entities ground truth) and the train set (the json's)."""
    root = tmp_path / "flickr30k" / "flickr30k"
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "42.txt").write_text(SENTENCES)
    (root / "Annotations" / "42.xml").write_text(XML)
    (tmp_path / "mdetr_annotations").mkdir()
    for split in ("train", "val"):
        path = tmp_path / "mdetr_annotations" / f"final_flickr_separateGT_{split}.json"
        path.write_text(json.dumps(_mdetr_json()))
    register_flickr30k(str(tmp_path), prefix=PREFIX)
    yield root, {"entities": f"{PREFIX}_val", "json": f"{PREFIX}_train"}
    for split in ("train", "val", "test"):
        DatasetCatalog.remove(f"{PREFIX}_{split}")
        MetadataCatalog.remove(f"{PREFIX}_{split}")


def test_sentences_give_each_phrase_its_entity_and_types(flickr):
    root, _ = flickr
    first, second = read_sentences(str(root / "Sentences" / "42.txt"))
    assert [(p["text"], p["entity_id"], p["types"]) for p in first] == [
        ("A man", 1, ["people"]),
        ("a blue shirt", 2, ["clothing"]),
        ("a dog", 3, ["animals", "other"]),
        ("the park", 4, ["scene"]),
    ]
    assert second == [{"text": "The shirt", "entity_id": 2, "types": ["clothing"]}]


def test_annotations_give_every_box_of_an_entity_and_skip_boxless_ones(flickr):
    root, _ = flickr
    boxes = read_entity_boxes(str(root / "Annotations" / "42.xml"))
    assert boxes == {1: [[110, 10, 150, 90]], 2: [[112, 30, 148, 60]], 3: [DOG_A, DOG_B]}


def test_evaluation_records_read_the_entities_boxes_and_types(flickr):
    _, names = flickr
    from_json = DatasetCatalog.get(names["json"])
    from_entities = DatasetCatalog.get(names["entities"])
    dog_json, dog = from_json[0]["phrases"][2], from_entities[0]["phrases"][2]
    assert dog_json["boxes"] == [DOG_B] and dog_json["phrase_type"] == "unknown"
    assert dog["boxes"] == [DOG_A, DOG_B] and dog["phrase_type"] == ["animals", "other"]
    assert [p["phrase_type"] for p in from_entities[0]["phrases"]] == [
        "people",
        "clothing",
        ["animals", "other"],
    ]  # the park has no box: not a phrase of the evaluation
    assert from_entities[1]["phrases"][0]["boxes"] == [[112, 30, 148, 60]]
    # the training set keeps the json's phrases; training reads only the annotations, untouched
    assert from_entities[0]["annotations"] == from_json[0]["annotations"]


def test_a_prediction_matching_only_the_box_the_json_dropped_is_a_hit(flickr):
    """The dog's prediction overlaps box A at IoU 0.5 and box B at 0.47: a hit against the
    Entities ground truth (the original's), a miss against MDETR's json."""
    _, names = flickr
    recalls = {}
    for kind, name in names.items():
        evaluator = FlickrRecallEvaluator(name, distributed=False)
        evaluator.reset()
        for record in DatasetCatalog.get(name):
            inst = Instances((200, 200))
            box = [0, 50, 101, 101] if record["image_id"] == 0 else [300, 300, 310, 310]
            inst.pred_boxes = Boxes(torch.tensor([box], dtype=torch.float32))  # +1 on x2, y2
            inst.scores = torch.tensor([0.9])
            inst.pred_classes = torch.tensor([2 if record["image_id"] == 0 else 0])
            evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
        recalls[kind] = evaluator.evaluate()["grounding"]
    assert recalls["json"]["R@1"] == pytest.approx(0.0)
    assert recalls["entities"]["R@1"] == pytest.approx(100 / 4)  # 1 of 4 phrases
    assert recalls["entities"]["R@1-animals"] == pytest.approx(100.0)
    assert "R@1-unknown" in recalls["json"] and "R@1-animals" not in recalls["json"]


def test_mismatches_and_missing_files_name_the_record_and_file(flickr, tmp_path):
    root, names = flickr
    records = DatasetCatalog.get(names["json"])
    records[0]["phrases"][2]["text"] = "a cat"
    with pytest.raises(
        ValueError, match=r"record 0 .*'a cat' is 'a dog' in sentence 0 of .*42.txt"
    ):
        entities_ground_truth(records, str(root))
    records = DatasetCatalog.get(names["json"])
    records[1]["phrases"].append(dict(records[1]["phrases"][0]))
    with pytest.raises(ValueError, match=r"record 1 .*2 phrases, but sentence 1 of .*42.txt has 1"):
        entities_ground_truth(records, str(root))
    records = DatasetCatalog.get(names["json"])
    records[0]["original_image_id"] = 7
    with pytest.raises(ValueError, match=r"Entities file missing: .*Sentences/7.txt"):
        entities_ground_truth(records, str(root))
    xml = root / "Annotations" / "42.xml"
    xml.write_text(XML.replace("<name>2</name>", "<name>two</name>"))
    with pytest.raises(ValueError, match=r"42.xml: entity name 'two' is not an entity id"):
        read_entity_boxes(str(xml))
    xml.write_text(XML.replace("<ymin>30</ymin>", "<ymin>3O</ymin>"))
    with pytest.raises(ValueError, match=r"42.xml: a bndbox has a missing or non-numeric"):
        read_entity_boxes(str(xml))
    xml.write_text(XML[:-20])
    with pytest.raises(ValueError, match=r"42.xml: not readable XML"):
        read_entity_boxes(str(xml))
    (root / "Sentences" / "42.txt").write_text("[/EN#1/people A man is here .\n")
    with pytest.raises(ValueError, match=r"42.txt:1: a phrase is not closed"):
        read_sentences(str(root / "Sentences" / "42.txt"))


def test_without_the_entities_folder_the_json_serves_with_a_warning(flickr, tmp_path, caplog):
    _, names = flickr
    records = DatasetCatalog.get(names["json"])
    with caplog.at_level(logging.WARNING):
        out = _flickr_ground_truth(str(tmp_path / "absent"), records)
    assert out is records and out[0]["phrases"][2]["boxes"] == [DOG_B]
    assert "Flickr30k Entities Annotations/ and Sentences/ not found" in caplog.text


def test_boxes_that_are_no_boxes_are_left_out_with_a_warning(flickr, caplog):
    """An inverted or non-finite bndbox was kept as ground truth (the MDETR json's loader drops
    such boxes); a zero-height one stays, as the original keeps every box of the file."""
    root, _ = flickr
    xml = root / "Annotations" / "42.xml"
    inverted = "<xmin>150</xmin><ymin>10</ymin><xmax>110</xmax><ymax>90</ymax>"
    xml.write_text(
        XML.replace("<xmin>110</xmin><ymin>10</ymin><xmax>150</xmax><ymax>90</ymax>", inverted)
        .replace("<ymin>30</ymin>", "<ymin>nan</ymin>")
        .replace(f"<ymax>{DOG_B[3]}</ymax>", f"<ymax>{DOG_B[1]}</ymax>")
    )
    with caplog.at_level(logging.WARNING):
        boxes = read_entity_boxes(str(xml))
    assert boxes == {3: [DOG_A, [0, 0, 100, 0]]}  # DOG_B, zero height
    assert "42.xml: 2 box(es) left out of the ground truth" in caplog.text
    assert "(first: [150.0, 10.0, 110.0, 90.0])" in caplog.text


def test_a_sentences_file_that_is_not_utf8_names_its_line(flickr):
    """The decode error named no file (the evaluation blamed the MDETR json)."""
    root, _ = flickr
    path = root / "Sentences" / "42.txt"
    path.write_bytes(SENTENCES.encode() + b"[/EN#2/clothing Caf\xe9] .\n")
    with pytest.raises(ValueError, match=r"42.txt:3: not UTF-8 text \(invalid continuation byte"):
        read_sentences(str(path))
