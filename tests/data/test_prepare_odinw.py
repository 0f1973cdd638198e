"""Tests of tools/prepare_odinw.py (ODinW background-category removal)."""

import json

import pytest
from tool_scripts import load_tool

prepare_odinw = load_tool("prepare_odinw")


def roboflow_json():
    return {
        "info": {"description": "Exported from roboflow.ai"},
        "images": [{"id": 0, "file_name": "a.jpg", "height": 416, "width": 416}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12,
             "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 2, "bbox": [5, 6, 7, 8], "area": 56,
             "iscrowd": 0},
        ],
        "categories": [
            {"id": 0, "name": "aquarium", "supercategory": "none"},
            {"id": 1, "name": "fish", "supercategory": "aquarium"},
            {"id": 2, "name": "jellyfish", "supercategory": "aquarium"},
            {"id": 3, "name": "penguin", "supercategory": "aquarium"},
        ],
    }  # fmt: skip


def test_remove_background_categories():
    out, removed = prepare_odinw.remove_background_categories(roboflow_json())
    assert [c["name"] for c in removed] == ["aquarium"]
    assert [c["id"] for c in out["categories"]] == [1, 2, 3]  # unused real class kept
    assert len(out["annotations"]) == 2 and out["images"] == roboflow_json()["images"]
    data = roboflow_json()
    data["categories"].append({"id": 9, "name": "Background", "supercategory": "x"})
    data["annotations"].append(dict(data["annotations"][0], id=5, category_id=9))
    out, removed = prepare_odinw.remove_background_categories(data)
    assert {c["id"] for c in removed} == {0, 9} and len(out["annotations"]) == 2
    with pytest.raises(KeyError, match="categories"):
        prepare_odinw.remove_background_categories({"images": [], "annotations": []})


def test_main_converts_a_tree(tmp_path):
    for variant in ("train", "valid"):
        d = tmp_path / "Aquarium" / "raw" / variant
        d.mkdir(parents=True)
        (d / "_annotations.coco.json").write_text(json.dumps(roboflow_json()))
    assert prepare_odinw.main([str(tmp_path)]) == 0
    outs = sorted(tmp_path.rglob("annotations_without_background.json"))
    assert len(outs) == 2
    assert [c["name"] for c in json.loads(outs[0].read_text())["categories"]] == [
        "fish",
        "jellyfish",
        "penguin",
    ]
    with pytest.raises(SystemExit, match="missing does not exist"):
        prepare_odinw.main([str(tmp_path / "missing")])


def test_a_run_killed_while_writing_leaves_no_file_that_a_rerun_would_skip(tmp_path, monkeypatch):
    """The outputs appear whole or not at all: an existing output is skipped on the next run, so a
    half-written one would stay."""
    d = tmp_path / "Aquarium" / "train"
    d.mkdir(parents=True)
    (d / "_annotations.coco.json").write_text(json.dumps(roboflow_json()))
    dump = json.dump

    def killed_midway(obj, f, **kwargs):
        f.write('{"images": [')
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_odinw.json, "dump", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_odinw.main([str(tmp_path)])
    assert sorted(p.name for p in d.iterdir()) == ["_annotations.coco.json"]
    monkeypatch.setattr(prepare_odinw.json, "dump", dump)
    assert prepare_odinw.main([str(tmp_path), "--shots", "1"]) == 0
    written = {p.name: json.loads(p.read_text()) for p in d.iterdir()}
    assert len(written["annotations_without_background.json"]["categories"]) == 3
    assert len(written["annotations_without_background_1shot_seed0.json"]["images"]) == 1


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "does not exist"),
        ('{"images": [', "Expecting value"),
        ('{"images": [], "annotations": []}', "not a COCO detection json: missing 'categories'"),
        (
            '{"images": [{"id": 1}], "annotations": [{"id": 1}], "categories": [{"id": 1}]}',
            "a record has no field 'category_id'",
        ),
    ],
)
def test_bad_export_is_one_error_line(tmp_path, content, needle):
    """A missing path or an unreadable Roboflow export: one line naming it, not a traceback."""
    target = tmp_path / "odinw" / "train" / prepare_odinw.INPUT_NAME
    if content is not None:
        target.parent.mkdir(parents=True)
        target.write_text(content)
    with pytest.raises(SystemExit) as err:
        prepare_odinw.main([str(tmp_path / "odinw")])
    line = str(err.value.code)
    assert line.startswith("error: ") and needle in line and "\n" not in line
    if content is not None:
        assert str(target) in line
