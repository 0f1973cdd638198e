"""Tests of the shapes-world VQA / NLVR2 generator (fiber_d2.data.shapes_vl)."""

import json
from collections import Counter

import pytest
from test_shapes import where  # the same reading of a relation

from fiber_d2.data.shapes import CATEGORY_NAMES, generate_shapes, shapes_files
from fiber_d2.data.shapes_vl import ensure_shapes_vl, generate_shapes_vl, shapes_vl_files

SMALL = dict(num_train=12, num_val=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = generate_shapes(tmp_path_factory.mktemp("world"), seed=3, **SMALL)
    return generate_shapes_vl(root)


def _vl_bytes(root):
    return [
        open(shapes_vl_files(root, s)[k], "rb").read()
        for s in ("train", "val")
        for k in ("vqa", "nlvr2")
    ]


def test_same_seed_same_files_and_seed_matters(world, tmp_path):
    again = ensure_shapes_vl(generate_shapes(tmp_path / "again", seed=3, **SMALL))
    other = ensure_shapes_vl(generate_shapes(tmp_path / "other", seed=4, **SMALL))
    assert _vl_bytes(world) == _vl_bytes(again)
    assert _vl_bytes(world) != _vl_bytes(other)


def test_files_of_an_older_version_are_rewritten(world, tmp_path):
    root = ensure_shapes_vl(generate_shapes(tmp_path / "stale", seed=3, **SMALL))
    marker = root / "annotations" / "vl_meta.json"
    meta = json.loads(marker.read_text())
    meta["version"] -= 1
    marker.write_text(json.dumps(meta))
    with open(shapes_vl_files(root, "val")["nlvr2"], "w") as f:
        f.write("[]")  # as an older version might have left it
    ensure_shapes_vl(root)
    assert json.loads(marker.read_text())["version"] == meta["version"] + 1
    assert _vl_bytes(root) == _vl_bytes(world)
    assert not list((root / "annotations").glob("*.tmp*"))


def _scene(root, split, file_name):
    det = json.load(open(shapes_files(root, split)["det"]))
    image = next(im for im in det["images"] if im["file_name"] == file_name)
    shapes = []
    for a in det["annotations"]:
        if a["image_id"] == image["id"]:
            colour, kind = CATEGORY_NAMES[a["category_id"] - 1].split()
            x, y, w, h = a["bbox"]
            shapes.append((colour, kind, x + w / 2, y + h / 2))
    return shapes


def _place(a, b) -> str:
    """Where shape ``a`` (colour, kind, centre x, centre y) lies relative to ``b``, as the questions
    word it ("left", "right", "above", "below")."""
    return where(a[2:], b[2:]).removesuffix(" of")


def test_vqa_answers_match_the_pictures(world):
    questions = json.load(open(shapes_vl_files(world, "train")["vqa"]))["questions"]
    assert len({q["question_id"] for q in questions}) == len(questions)
    types = Counter(q["question_type"] for q in questions)
    assert set(types) == {
        "count_kind",
        "count_colour",
        "exists",
        "colour_of_kind",
        "kind_of_colour",
        "colour_relative",
        "relation",
    }
    for q in questions:
        assert len(q["answers"]) == 10
        answer, shapes = q["answers"][0], _scene(world, "train", q["file_name"])
        words = q["question"].rstrip("?").split()
        if q["question_type"] == "count_kind":  # "how many circles are there"
            assert int(answer) == sum(k + "s" == words[2] for _, k, _, _ in shapes)
        elif q["question_type"] == "exists":  # "is there a red circle"
            assert (answer == "yes") == any((c, k) == (words[3], words[4]) for c, k, _, _ in shapes)
        elif q["question_type"] == "colour_of_kind":  # "what color is the circle"
            (colour,) = [c for c, k, _, _ in shapes if k == words[4]]
            assert answer == colour
        elif q["question_type"] == "relation":  # "is the red circle left of the blue square"
            a = next(s for s in shapes if s[:2] == (words[2], words[3]))
            b = next(s for s in shapes if s[:2] == tuple(words[-2:]))
            assert (answer == "yes") == (words[4] == _place(a, b))
        elif q["question_type"] == "count_colour":  # "how many red shapes are there"
            assert int(answer) == sum(c == words[2] for c, _, _, _ in shapes)
        elif q["question_type"] == "kind_of_colour":  # "what shape is the red one"
            (kind,) = [k for c, k, _, _ in shapes if c == words[4]]
            assert answer == kind
        elif q["question_type"] == "colour_relative":
            # "what color is the circle left of the red square": the one circle in that place
            kind, place, ref_name = words[4], words[5], tuple(words[-2:])
            (ref,) = [s for s in shapes if s[:2] == ref_name]
            (hit,) = [
                s for s in shapes if s is not ref and s[1] == kind and _place(s, ref) == place
            ]
            assert answer == hit[0]
    yes_no = Counter(q["answers"][0] for q in questions if q["answer_type"] == "yes/no")
    assert abs(yes_no["yes"] - yes_no["no"]) <= 0.3 * sum(yes_no.values())


@pytest.mark.parametrize("split", ["train", "val"])
def test_nlvr2_labels_match_the_pictures_and_are_balanced(world, split):
    pairs = json.load(open(shapes_vl_files(world, split)["nlvr2"]))
    labels = Counter(p["label"] for p in pairs)
    assert labels["True"] == labels["False"] and len(pairs) >= 20
    for p in pairs:
        left, right = (_scene(world, split, p[f"file_name_{k}"]) for k in (0, 1))
        words = p["sentence"].split()
        truth = None
        if words[0] == "both":  # both images contain a red circle
            want = (words[4], words[5])
            truth = all(any(s[:2] == want for s in x) for x in (left, right))
        elif words[3] == "contains":  # the left image contains a red circle
            side = left if words[1] == "left" else right
            truth = any(s[:2] == (words[5], words[6]) for s in side)
        else:  # the left image has more circles than the right image
            kind = words[5][:-1]
            more, less = (left, right) if words[1] == "left" else (right, left)
            truth = sum(s[1] == kind for s in more) > sum(s[1] == kind for s in less)
        assert truth == (p["label"] == "True"), p


def test_yes_no_answers_are_balanced_per_question_type(tmp_path):
    """Existence ("is there a ...?") and relation ("is the ... left of the ...?") questions are
    each answered yes about half of the time (0.35..0.65 over some 90 of each on 100 images), so
    that neither type can be answered from its wording alone."""
    root = generate_shapes_vl(generate_shapes(tmp_path, seed=3, num_train=100, num_val=1))
    questions = json.load(open(shapes_vl_files(root, "train")["vqa"]))["questions"]
    for qtype in ("exists", "relation"):
        answers = [q["answers"][0] for q in questions if q["question_type"] == qtype]
        assert len(answers) >= 80, qtype
        assert 0.35 <= answers.count("yes") / len(answers) <= 0.65, qtype
