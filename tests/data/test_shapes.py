"""Tests of the shapes world generator and its tokenizer."""

import json
import os
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from fiber_d2.data.shapes import (
    CATEGORY_NAMES,
    COLORS,
    SHAPES_VOCAB_SIZE,
    build_shapes_tokenizer,
    ensure_shapes_tokenizer,
    ensure_shapes_world,
    generate_shapes,
    shapes_files,
    shapes_root_in,
)
from fiber_d2.text import SHAPES_TOKENIZER, build_tokenizer

SMALL = dict(num_train=6, num_val=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("world"), seed=3, **SMALL)


def _json_files(root):
    names = []
    for split in ("train", "val"):
        files = shapes_files(root, split)
        names += [files[k] for k in ("det", "grounding", "refexp", "captions")]
    return names


def test_same_seed_is_byte_identical_and_seed_matters(world, tmp_path):
    again = generate_shapes(tmp_path / "again", seed=3, **SMALL)
    other = generate_shapes(tmp_path / "other", seed=4, **SMALL)
    for a, b, c in zip(_json_files(world), _json_files(again), _json_files(other)):
        with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
            data_a = fa.read()
            assert data_a == fb.read()
            assert data_a != fc.read()


def test_detection_json_matches_pixels_and_has_distractors(world):
    det = json.load(open(shapes_files(world, "train")["det"]))
    assert [c["name"] for c in det["categories"]] == list(CATEGORY_NAMES)
    by_image = defaultdict(list)
    for a in det["annotations"]:
        by_image[a["image_id"]].append(a)
    image_root = shapes_files(world, "train")["image_root"]
    assert len(det["images"]) == SMALL["num_train"]
    for img in det["images"]:
        pixels = np.asarray(Image.open(os.path.join(image_root, img["file_name"])).convert("RGB"))
        assert pixels.shape == (img["height"], img["width"], 3)
        anns = by_image[img["id"]]
        names = [CATEGORY_NAMES[a["category_id"] - 1].split() for a in anns]
        # distractor: some kind appears in two colours
        kinds = defaultdict(set)
        for colour, kind in names:
            kinds[kind].add(colour)
        assert any(len(colours) >= 2 for colours in kinds.values())
        for a, (colour, kind) in zip(anns, names):
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            cx, cy = int(x + w / 2), int(y + (0.7 if kind == "triangle" else 0.5) * h)
            assert tuple(pixels[cy, cx]) == COLORS[colour], (img["file_name"], a)
            corner = tuple(pixels[int(y), int(x)])  # circles and triangles leave corners empty
            assert (corner == COLORS[colour]) == (kind == "square")


def test_grounding_phrases_name_their_boxes(world):
    files = shapes_files(world, "val")
    det = json.load(open(files["det"]))
    ground = json.load(open(files["grounding"]))
    box_to_name = {
        (a["image_id"], tuple(a["bbox"])): CATEGORY_NAMES[a["category_id"] - 1]
        for a in det["annotations"]
    }
    entries = {e["id"]: e for e in ground["images"]}
    assert len(entries) == SMALL["num_val"] * 2
    for a in ground["annotations"]:
        entry = entries[a["image_id"]]
        ((s, e),) = a["tokens_positive"]
        phrase = entry["caption"][s:e]
        assert [[s, e]] in entry["tokens_positive_eval"]
        colour_kind = box_to_name[(entry["original_img_id"], tuple(a["bbox"]))]
        colour, kind = colour_kind.split()
        assert kind in phrase and (colour in phrase or phrase == f"the {kind}s")
        assert a["category_id"] == 1
    refexp = json.load(open(files["refexp"]))
    ref_entries = {e["id"]: e for e in refexp["images"]}
    for a in refexp["annotations"]:
        entry = ref_entries[a["image_id"]]
        ((s, e),) = a["tokens_positive"]
        assert entry["caption"][s:e].endswith(CATEGORY_NAMES[a["category_id"] - 1])
        assert (
            box_to_name[(entry["original_id"], tuple(a["bbox"]))]
            == CATEGORY_NAMES[a["category_id"] - 1]
        )
    lines = open(files["captions"]).read().splitlines()
    assert len(lines) == SMALL["num_val"]
    first = json.loads(lines[0])
    assert first["captions"][0].startswith("a picture of ") and len(set(first["captions"])) >= 2


def test_tokenizer_round_trip_offline(tmp_path):
    from transformers import AutoTokenizer

    built = build_shapes_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == SHAPES_VOCAB_SIZE == len(built)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    assert [tok.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2, 3]
    assert tok.mask_token_id is not None and tok.mask_token_id < SHAPES_VOCAB_SIZE
    text = "the small red circle left of a blue square. a person riding a bicycle"
    enc = tok(text, return_offsets_mapping=True)
    assert enc["input_ids"] == built(text)["input_ids"]
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    pieces = [text[s:e] for s, e in enc["offset_mapping"][1:-1]]
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    # world words are single tokens after a space
    for word in ("red", "circle", "square", "triangle", "yellow", "left"):
        assert len(tok.tokenize(" " + word)) == 1


def test_ensure_world_is_lazy_and_once(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    assert ensure_shapes_world(root, seed=0, **SMALL) == root
    meta = root / "meta.json"
    stamp = meta.stat().st_mtime_ns
    ensure_shapes_world(root, seed=0, **SMALL)
    assert meta.stat().st_mtime_ns == stamp
    assert not [p for p in root.iterdir() if p.name.startswith(".generating")]
    assert json.load(open(meta))["num_images"] == {"train": 6, "val": 3}


def test_ensure_world_replaces_what_an_interrupted_generation_left(tmp_path):
    """A world without meta.json (a run killed while moving it into place) is generated again;
    the folders it left are replaced, not merged into."""
    root = tmp_path / "shapes"
    for name in ("images", "annotations"):
        (root / name).mkdir(parents=True)
        (root / name / "stale.txt").write_text("from the killed run")
    ensure_shapes_world(root, seed=0, **SMALL)
    assert (root / "meta.json").exists()
    assert not list(root.rglob("stale.txt"))
    assert len(list((root / "images").rglob("*.png")) + list((root / "images").rglob("*.jpg"))) == 9


def test_builtin_tokenizer_name_builds_under_the_datasets_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    build_tokenizer.cache_clear()
    try:
        tok = build_tokenizer(SHAPES_TOKENIZER)
        assert (tmp_path / "shapes" / "tokenizer" / "tokenizer.json").exists()
        assert len(tok) == SHAPES_VOCAB_SIZE
        assert ensure_shapes_tokenizer(tmp_path / "shapes") == tmp_path / "shapes" / "tokenizer"
    finally:
        build_tokenizer.cache_clear()


def test_shapes_folder_of_a_datasets_root(tmp_path, monkeypatch):
    """A given datasets root holds the world in ``shapes/``; without one, the variable decides."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "env"))
    assert shapes_root_in(str(tmp_path / "given")) == tmp_path / "given" / "shapes"
    assert shapes_root_in(None) == tmp_path / "env" / "shapes"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes(tmp_path, image_size=(40, 50))
    with pytest.raises(KeyError, match="test"):
        shapes_files(tmp_path, "test")


def _shapes_by_image(det):
    """{image id: [(size, colour, kind, (cx, cy))]}; size read from the side (small shapes are
    12-18 px, large ones 26-36 px)."""
    out = defaultdict(list)
    for a in det["annotations"]:
        colour, kind = CATEGORY_NAMES[a["category_id"] - 1].split()
        x, y, w, h = a["bbox"]
        out[a["image_id"]].append(
            ("small" if w <= 18 else "large", colour, kind, (x + w / 2, y + h / 2))
        )
    return out


def where(a, b) -> str:
    """Where centre ``a`` lies relative to centre ``b`` (along the larger offset, y down)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _named(phrase, shapes):
    """The shapes a phrase "the [size] colour kind" fits."""
    words = phrase.split()[1:]
    return [s for s in shapes if tuple(words) in (s[:3], s[1:3])]


@pytest.mark.parametrize("split", ["train", "val"])
def test_refexps_name_one_shape_and_their_relation_holds(world, split):
    """A referring expression "the [size] colour kind REL the [size] colour kind" names exactly
    one shape on each side (the size is added when two shapes share colour and kind), the first
    is the annotated box, and REL is where its centre lies relative to the second's."""
    files = shapes_files(world, split)
    shapes = _shapes_by_image(json.load(open(files["det"])))
    refexp = json.load(open(files["refexp"]))
    boxes = {a["image_id"]: a["bbox"] for a in refexp["annotations"]}
    relations = ("left of", "right of", "above", "below")
    for entry in refexp["images"]:
        caption, scene = entry["caption"], shapes[entry["original_id"]]
        relation = next(r for r in relations if f" {r} the " in caption)
        first, second = caption.split(f" {relation} ")
        (target,), (other,) = _named(first, scene), _named(second, scene)
        x, y, w, h = boxes[entry["id"]]
        assert target[3] == (x + w / 2, y + h / 2), caption
        assert where(target[3], other[3]) == relation, caption


def test_grounding_relations_hold(world):
    """A grounding caption "a ... REL a ..." puts the first phrase's box REL the second's."""
    files = shapes_files(world, "train")
    ground = json.load(open(files["grounding"]))
    centre = {}
    for a in ground["annotations"]:
        x, y, w, h = a["bbox"]
        centre[(a["image_id"], tuple(a["tokens_positive"][0]))] = (x + w / 2, y + h / 2)
    checked = 0
    for entry in ground["images"]:
        spans = [tuple(p[0]) for p in entry["tokens_positive_eval"]]
        if len(spans) != 2:
            continue
        between = entry["caption"][spans[0][1] : spans[1][0]].strip()
        if between == "and":
            continue
        first, second = (centre[(entry["id"], s)] for s in spans)
        assert where(first, second) == between, entry["caption"]
        checked += 1
    assert checked >= 2


def test_scene_caption_lists_every_shape_left_to_right(world):
    files = shapes_files(world, "val")
    shapes = _shapes_by_image(json.load(open(files["det"])))
    for line in open(files["captions"]).read().splitlines():
        item = json.loads(line)
        text = item["captions"][0][len("a picture of ") :]
        head, last = text.rsplit(" and ", 1)
        named = [tuple(n.split()[1:]) for n in head.split(", ") + [last]]
        ordered = sorted(shapes[item["image_id"]], key=lambda s: s[3])
        assert named == [s[:3] for s in ordered], item


def test_splits_hold_different_scenes(world):
    def scenes(split):
        det = json.load(open(shapes_files(world, split)["det"]))
        by_image = defaultdict(list)
        for a in det["annotations"]:
            by_image[a["image_id"]].append((a["category_id"], tuple(a["bbox"])))
        return {tuple(v) for v in by_image.values()}

    assert not scenes("train") & scenes("val")
