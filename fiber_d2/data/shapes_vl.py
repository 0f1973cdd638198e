"""Vision-language tasks on the built-in shapes world: VQA questions and NLVR2-style image pairs.

Both are derived from the SAME world (images and ``det_{split}.json`` of :mod:`fiber_d2.data.shapes`)
and the same seed (``meta.json``), so a given world always yields byte-identical files:

* ``annotations/vqa_{split}.json``: ``{"questions": [...]}``, one entry per question with
  ``question_id``, ``image_id``, ``file_name``, ``height``, ``width``, ``question``, ``answers`` (10
  "annotator" answers, as in VQAv2; all equal here), ``answer_type`` ("yes/no", "number", "other")
  and ``question_type``. Questions ask about colour ("what color is the circle left of the blue
  square?"), kind ("what shape is the red one?"), count ("how many triangles are there?"),
  existence ("is there a green circle?") and relative position ("is the red circle left of the
  blue square?"); yes/no answers are balanced.
* ``annotations/nlvr2_{split}.json``: a list of ``{"identifier", "file_name_0", "file_name_1",
  "sentence", "label"}`` (label "True"/"False", balanced): two images of the split and one statement
  about them, e.g. "the left image has more circles than the right image", "both images contain a
  red square".

:func:`ensure_shapes_vl` generates the world (if needed) and these files on first use.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Union

from .shapes import (
    CATEGORY_NAMES,
    SHAPE_KINDS,
    SPLITS,
    _file_lock,
    _relation,
    _Shape,
    ensure_shapes_world,
    shapes_files,
    shapes_root,
    write_json,
)

__all__ = ["shapes_vl_files", "generate_shapes_vl", "ensure_shapes_vl", "NUM_VQA_ANNOTATORS"]

logger = logging.getLogger(__name__)

NUM_VQA_ANNOTATORS = 10
_VL_VERSION = 2  # 2: 32 NLVR2 pairs per image (4 in version 1); the VQA files are unchanged
_RELATIONS = ("left of", "right of", "above", "below")
_QUESTIONS_PER_IMAGE = 6
# Pairs are cheap to draw from the same images: 8,192 / 2,048 for the 256 / 64 images of the default
# world. 4 per image (1,024 / 256) was memorised by the task stage, and 256 held-out pairs measured
# accuracy only to +-3 points (one standard error); 2,048 do so to +-1.1.
_PAIRS_PER_IMAGE = 32


def shapes_vl_files(root: Union[str, os.PathLike], split: str) -> Dict[str, str]:
    """Paths of one split's VQA and NLVR2 files: keys ``image_root``, ``vqa``, ``nlvr2``."""
    files = shapes_files(root, split)
    ann = Path(files["det"]).parent
    return {
        "image_root": files["image_root"],
        "vqa": str(ann / f"vqa_{split}.json"),
        "nlvr2": str(ann / f"nlvr2_{split}.json"),
    }


def _read_scenes(det_file: str) -> List[dict]:
    """Per image of a ``det_{split}.json``: file name, size and its shapes."""
    with open(det_file, encoding="utf-8") as f:
        det = json.load(f)
    shapes: Dict[int, List[_Shape]] = {im["id"]: [] for im in det["images"]}
    for a in det["annotations"]:
        colour, kind = CATEGORY_NAMES[a["category_id"] - 1].split(" ")
        x, y, w, h = a["bbox"]
        shapes[a["image_id"]].append(_Shape(colour, kind, "", (x, y, x + w, y + h)))
    return [{**im, "shapes": shapes[im["id"]]} for im in det["images"]]


def _unique(shapes: List[_Shape], **attrs) -> Optional[_Shape]:
    found = [s for s in shapes if all(getattr(s, k) == v for k, v in attrs.items())]
    return found[0] if len(found) == 1 else None


def _question(shapes: List[_Shape], qtype: str, rng: random.Random):
    """(question, answer, answer_type) of ``qtype`` for one scene, or None when not askable."""
    colours = sorted({s.colour for s in shapes})
    all_colours = ("red", "green", "blue", "yellow")
    if qtype == "count_kind":
        kind = rng.choice(SHAPE_KINDS)
        n = sum(s.kind == kind for s in shapes)
        return f"how many {kind}s are there?", str(n), "number"
    if qtype == "count_colour":
        colour = rng.choice(all_colours)
        n = sum(s.colour == colour for s in shapes)
        return f"how many {colour} shapes are there?", str(n), "number"
    if qtype == "exists":
        present = {(s.colour, s.kind) for s in shapes}
        want = rng.random() < 0.5
        pool = (
            sorted(present)
            if want
            else [(c, k) for c in all_colours for k in SHAPE_KINDS if (c, k) not in present]
        )
        c, k = rng.choice(pool)
        return f"is there a {c} {k}?", "yes" if want else "no", "yes/no"
    if qtype == "colour_of_kind":
        kinds = [k for k in SHAPE_KINDS if _unique(shapes, kind=k)]
        if not kinds:
            return None
        kind = rng.choice(kinds)
        return f"what color is the {kind}?", _unique(shapes, kind=kind).colour, "other"
    if qtype == "kind_of_colour":
        cols = [c for c in colours if _unique(shapes, colour=c)]
        if not cols:
            return None
        colour = rng.choice(cols)
        return f"what shape is the {colour} one?", _unique(shapes, colour=colour).kind, "other"
    refs = [s for s in shapes if _unique(shapes, colour=s.colour, kind=s.kind)]
    if qtype == "colour_relative":
        options = []
        for ref in refs:
            for kind in SHAPE_KINDS:
                for rel in _RELATIONS:
                    hits = [s for s in shapes if s is not ref and s.kind == kind]
                    hits = [s for s in hits if _relation(s, ref) == rel]
                    if len(hits) == 1 and sum(s.kind == kind for s in shapes) > 1:
                        options.append((kind, rel, ref, hits[0].colour))
        if not options:
            return None
        kind, rel, ref, answer = rng.choice(options)
        return f"what color is the {kind} {rel} the {ref.colour} {ref.kind}?", answer, "other"
    if qtype == "relation":
        if len(refs) < 2:
            return None
        a, b = rng.sample(refs, 2)
        truth = _relation(a, b)
        want = rng.random() < 0.5
        rel = truth if want else rng.choice([r for r in _RELATIONS if r != truth])
        text = f"is the {a.colour} {a.kind} {rel} the {b.colour} {b.kind}?"
        return text, "yes" if want else "no", "yes/no"
    raise KeyError(qtype)


_QTYPES = (
    "count_kind",
    "count_colour",
    "exists",
    "colour_of_kind",
    "kind_of_colour",
    "colour_relative",
    "relation",
)


def _vqa_split(scenes: List[dict], rng: random.Random, first_id: int) -> List[dict]:
    out = []
    for scene in scenes:
        seen = set()
        order = list(_QTYPES)
        rng.shuffle(order)
        for qtype in order:
            if len(seen) >= _QUESTIONS_PER_IMAGE:
                break
            q = _question(scene["shapes"], qtype, rng)
            if q is None or q[0] in seen:
                continue
            seen.add(q[0])
            text, answer, answer_type = q
            out.append(
                {
                    "question_id": first_id + len(out),
                    "image_id": scene["id"],
                    "file_name": scene["file_name"],
                    "height": scene["height"],
                    "width": scene["width"],
                    "question": text,
                    "answers": [answer] * NUM_VQA_ANNOTATORS,
                    "answer_type": answer_type,
                    "question_type": qtype,
                }
            )
    return out


def _statement(left: List[_Shape], right: List[_Shape], rng: random.Random, want: bool):
    """A statement about (left, right) whose truth is ``want``, or None."""
    style = rng.random()
    has = lambda shapes, c, k: any((s.colour, s.kind) == (c, k) for s in shapes)  # noqa: E731
    pairs = [(c, k) for c in ("red", "green", "blue", "yellow") for k in SHAPE_KINDS]
    if style < 0.5:
        side, shapes = rng.choice((("left", left), ("right", right)))
        pool = [p for p in pairs if has(shapes, *p) == want]
        c, k = rng.choice(pool)
        return f"the {side} image contains a {c} {k}"
    if style < 0.7:
        pool = [p for p in pairs if (has(left, *p) and has(right, *p)) == want]
        if not pool:
            return None
        c, k = rng.choice(pool)
        return f"both images contain a {c} {k}"
    kind = rng.choice(SHAPE_KINDS)
    n_left, n_right = (sum(s.kind == kind for s in x) for x in (left, right))
    if n_left == n_right:
        return None
    more = "left" if n_left > n_right else "right"
    if not want:
        more = "right" if more == "left" else "left"
    less = "right" if more == "left" else "left"
    return f"the {more} image has more {kind}s than the {less} image"


def _nlvr2_split(scenes: List[dict], rng: random.Random, split: str) -> List[dict]:
    out = []
    n = len(scenes)
    for i in range(n * _PAIRS_PER_IMAGE):
        want = i % 2 == 0  # balanced labels
        for _ in range(50):
            a, b = rng.sample(range(n), 2) if n > 1 else (0, 0)
            text = _statement(scenes[a]["shapes"], scenes[b]["shapes"], rng, want)
            if text is not None:
                break
        else:
            continue
        out.append(
            {
                "identifier": f"{split}-{i}",
                "file_name_0": scenes[a]["file_name"],
                "file_name_1": scenes[b]["file_name"],
                "sentence": text,
                "label": "True" if want else "False",
            }
        )
    return out


def generate_shapes_vl(root: Union[str, os.PathLike]) -> Path:
    """Write ``vqa_{split}.json`` and ``nlvr2_{split}.json`` of an existing shapes world.

    Args:
        root: a complete world (with ``meta.json``).

    Returns:
        the root; ``annotations/vl_meta.json`` is written last and marks complete files.
    """
    root = Path(root)
    with open(root / "meta.json", encoding="utf-8") as f:
        seed = json.load(f)["seed"]
    stats = {}
    for split_index, split in enumerate(SPLITS):
        files = shapes_vl_files(root, split)
        scenes = _read_scenes(shapes_files(root, split)["det"])
        rng = random.Random(seed * 1000 + 100 + split_index)
        questions = _vqa_split(scenes, rng, first_id=(split_index + 1) * 1_000_000)
        pairs = _nlvr2_split(scenes, rng, split)
        write_json(files["vqa"], {"questions": questions})
        write_json(files["nlvr2"], pairs)
        stats[split] = {
            "questions": len(questions),
            "pairs": len(pairs),
            "answers": dict(Counter(q["answers"][0] for q in questions).most_common()),
        }
    meta = {"version": _VL_VERSION, "seed": seed, "splits": stats}
    write_json(root / "annotations" / "vl_meta.json", meta, indent=1)
    logger.info("wrote shapes VQA / NLVR2 files under %s", root / "annotations")
    return root


def ensure_shapes_vl(root: Union[str, os.PathLike, None] = None) -> Path:
    """Generate the shapes world (if needed) and its VQA / NLVR2 files (if missing or written by an
    older version of this module); process-safe.

    Args:
        root: world directory (default :func:`~fiber_d2.data.shapes.shapes_root`:
            ``$DETECTRON2_DATASETS/shapes`` when that variable is set, else
            ``$FIBER_D2_HOME/shapes``).

    Returns:
        the root path.
    """
    root = ensure_shapes_world(shapes_root(root))
    marker = root / "annotations" / "vl_meta.json"
    if _vl_version(marker) == _VL_VERSION:
        return root
    with _file_lock(root / ".lock_vl"):
        found = _vl_version(marker)
        if found != _VL_VERSION:
            if found is not None:
                logger.info(
                    "%s has version %s of the VQA / NLVR2 files; writing version %d",
                    marker,
                    found,
                    _VL_VERSION,
                )
            generate_shapes_vl(root)
    return root


def _vl_version(marker: Path) -> Optional[int]:
    """The version recorded in ``vl_meta.json``; None when the files were never completed."""
    if not marker.exists():
        return None
    with open(marker, encoding="utf-8") as f:
        return json.load(f).get("version")
