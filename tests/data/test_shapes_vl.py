"""Tests of the shapes-world VQA / NLVR2 generator (fiber_d2.data.shapes_vl) and the ALBEF RandAugment."""

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fiber_d2.data.shapes import CATEGORY_NAMES, COLORS, generate_shapes, shapes_files
from fiber_d2.data.shapes_vl import ensure_shapes_vl, generate_shapes_vl, shapes_vl_files
from fiber_d2.data.vl_transforms import AlbefRandAugment, build_vl_image_transform

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


def test_vqa_answers_match_the_pictures(world):
    questions = json.load(open(shapes_vl_files(world, "train")["vqa"]))["questions"]
    assert len({q["question_id"] for q in questions}) == len(questions)
    types = Counter(q["question_type"] for q in questions)
    assert {"count_kind", "exists", "colour_of_kind", "relation"} <= set(types)
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
            dx, dy = a[2] - b[2], a[3] - b[3]
            truth = (
                ("left" if dx < 0 else "right")
                if abs(dx) >= abs(dy)
                else ("above" if dy < 0 else "below")
            )
            assert (answer == "yes") == (words[4] == truth)
    yes_no = Counter(q["answers"][0] for q in questions if q["answer_type"] == "yes/no")
    assert abs(yes_no["yes"] - yes_no["no"]) <= 0.3 * sum(yes_no.values())


def test_nlvr2_labels_match_the_pictures_and_are_balanced(world):
    pairs = json.load(open(shapes_vl_files(world, "val")["nlvr2"]))
    labels = Counter(p["label"] for p in pairs)
    assert labels["True"] == labels["False"] and len(pairs) >= 20
    for p in pairs:
        left, right = (_scene(world, "val", p[f"file_name_{k}"]) for k in (0, 1))
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


def test_albef_randaug_ops_and_transforms():
    image = np.zeros((40, 50, 3), np.uint8)
    image[10:30, 10:30] = COLORS["red"]
    aug = AlbefRandAugment(2, 7, random.Random(0))
    pil = Image.fromarray(image)
    for op in AlbefRandAugment.OPS:
        out = aug.apply(pil, op)
        assert out.size == pil.size
    rotated = np.asarray(aug.apply(pil, "Rotate"))
    assert (rotated[0, 0] == 128).all()  # grey fill in the corners
    assert np.array_equal(np.asarray(aug.apply(pil, "Identity")), image)
    train = build_vl_image_transform("albef_randaug", 32, True, random.Random(0))
    test = build_vl_image_transform("albef_randaug", 32, False)
    assert train(image).shape == test(image).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="VL_TRAIN_TRANSFORM"):
        build_vl_image_transform("autoaugment", 32, True)


def test_albef_randaug_magnitudes_at_m7():
    """Spec coarse §5.2 at M = 7: brightness factor 1.36, shear 0.21 (the affine coefficient, about
    the top-left corner as the original's warp), translation 7 px."""
    aug = AlbefRandAugment(2, 7, random.Random(0))
    grey = Image.fromarray(np.full((20, 20, 3), 100, np.uint8))
    assert (np.asarray(aug.apply(grey, "Brightness")) == 136).all()
    line = np.zeros((41, 41, 3), np.uint8)
    line[:, 20] = 255  # a vertical line through the centre
    sheared = np.asarray(aug.apply(Image.fromarray(line), "ShearX"))[..., 0]
    # about the top-left corner: row 0 stays, row 30 moves by 0.21 * 30 = 6.3 px
    assert int(sheared[0].argmax()) == 20
    assert 5 <= abs(int(sheared[30].argmax()) - 20) <= 7
    dot = np.zeros((41, 41, 3), np.uint8)
    dot[20, 20] = 255
    moved = np.asarray(aug.apply(Image.fromarray(dot), "TranslateX"))[..., 0]
    assert np.argwhere(moved == 255).tolist() in ([[20, 13]], [[20, 27]])


def test_sharpness_wraps_around_as_the_original():
    """Factor 1.36 at M = 7 on a 200-grey image with one 250 pixel: the smoothing there is
    (8 * 200 + 5 * 250) / 13 = 219.2 (219), and 219 + 1.36 * 31 = 261.2 wraps to 261 - 256 = 5
    (PIL's enhancer clips it to 255); a neighbour, smoothed to 204 (203.8), reads
    204 + 1.36 * (200 - 204) = 198.6 -> 198; the border stays."""
    pixels = np.full((5, 5, 3), 200, np.uint8)
    pixels[2, 2] = 250
    out = np.asarray(
        AlbefRandAugment(2, 7, random.Random(0)).apply(Image.fromarray(pixels), "Sharpness")
    )
    assert (out[2, 2] == 5).all()
    assert (out[1, 2] == 198).all() and (out[2, 1] == 198).all()
    assert (out[0] == 200).all() and (out[:, 0] == 200).all()


def test_albef_randaug_applies_each_drawn_op_with_probability_half():
    class Counting(AlbefRandAugment):
        calls = 0

        def apply(self, image, op):
            Counting.calls += 1
            return image

    aug = Counting(2, 7, random.Random(1))
    image = Image.new("RGB", (8, 8))
    for _ in range(1000):
        aug(image)
    assert 850 <= Counting.calls <= 1150  # 2 draws x 0.5 x 1000


def test_albef_randaug_crop_keeps_half_the_image_and_flips_half_the_time():
    """RandomResizedCrop at scale (0.5, 1.0) (its aspect ratios 3/4..4/3): a crop keeps at least 61 %
    of the width, so it always spans both halves of a red-left / blue-right image; the horizontal
    flip puts blue on the left about half the time."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = COLORS["red"]
    image[:, 32:] = COLORS["blue"]
    train = build_vl_image_transform("albef_randaug", 64, True, random.Random(2))
    flipped = 0
    for _ in range(60):
        out = train(image).astype(int)
        red, blue = out[..., 0] > out[..., 2] + 40, out[..., 2] > out[..., 0] + 40
        assert red.any() and blue.any()
        left = out[28:36, 10:14]  # inside every crop, clear of rotation / translation fill
        flipped += int(left[..., 2].mean() > left[..., 0].mean())
    assert 15 <= flipped <= 45


def test_vl_transform_draws_follow_the_seeded_global_generators():
    """Flips and RandAugment ops draw from Python's global generator (crops from torch's), both of
    which detectron2 seeds from SEED in every DataLoader worker: seeded alike, the draws repeat;
    seeded apart, they differ (a private generator would repeat in every worker instead)."""
    import torch

    image = np.zeros((40, 50, 3), np.uint8)
    image[10:30, 5:20] = COLORS["red"]

    def draws(seed):
        random.seed(seed)
        torch.manual_seed(seed)
        train = build_vl_image_transform("albef_randaug", 32, True)
        return [train(image) for _ in range(6)]

    first, again, other = draws(0), draws(0), draws(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_evaluation_transform_is_the_bicubic_square_resize():
    """Spec coarse §4 / §5.2 ("albef"): a bicubic resize to S x S, the aspect ratio not kept."""
    g = np.random.default_rng(0)
    image = g.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = build_vl_image_transform("albef_randaug", 16, False)(image)
    bicubic = np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC))
    bilinear = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR))
    assert np.array_equal(out, bicubic) and not np.array_equal(out, bilinear)
