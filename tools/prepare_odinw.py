#!/usr/bin/env python
"""Prepare ODinW (Roboflow COCO exports) for ``register_grounding_coco``.

Roboflow's ``_annotations.coco.json`` files carry one dataset-level "background" category
(typically id 0, supercategory ``"none"``, named after the dataset) that no box uses; as a
prompt entry it would be a meaningless name. This tool removes such categories and writes
``annotations_without_background.json`` next to each input (the file name GLIP/FIBER's ODinW
configs read). Category ids are kept (detectron2 maps them to contiguous ids on load).

A category is background when its name is "background"/"__background__", or when its
supercategory is "none" and no annotation uses it.

With ``--shots K`` each ``train/`` file also gets a K-shot version,
``annotations_without_background_{K}shot_seed{S}.json`` (see :func:`sample_few_shot`), for the few-shot
configs in ``configs/ODinW/``.

Usage::

    python tools/prepare_odinw.py datasets/odinw            # every _annotations.coco.json below
    python tools/prepare_odinw.py datasets/odinw --shots 3 --seed 0
    python tools/prepare_odinw.py a/_annotations.coco.json --output-name clean.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Tuple

from tqdm import tqdm

from fiber_d2.checkpoint.safe_io import write_whole

__all__ = [
    "remove_background_categories",
    "sample_few_shot",
    "few_shot_name",
    "convert_file",
    "find_inputs",
    "main",
]

logger = logging.getLogger("fiber_d2.prepare_odinw")

INPUT_NAME = "_annotations.coco.json"
OUTPUT_NAME = "annotations_without_background.json"
_BACKGROUND_NAMES = {"background", "__background__"}


def remove_background_categories(data: dict) -> Tuple[dict, List[dict]]:
    """Drop background categories from a COCO detection dict.

    Args:
        data: COCO json content (``images``, ``annotations``, ``categories``).

    Returns:
        ``(converted, removed)``: a new dict without the background categories (annotations of
        removed categories dropped too, with a warning), and the removed category entries.
    """
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise KeyError(f"not a COCO detection json: missing {key!r}")
    used = {a["category_id"] for a in data["annotations"]}
    removed = [
        c
        for c in data["categories"]
        if str(c.get("name", "")).strip().lower() in _BACKGROUND_NAMES
        or (c.get("supercategory") == "none" and c["id"] not in used)
    ]
    removed_ids = {c["id"] for c in removed}
    kept_anns = [a for a in data["annotations"] if a["category_id"] not in removed_ids]
    if len(kept_anns) != len(data["annotations"]):
        logger.warning(
            "dropped %d annotations of background categories %s",
            len(data["annotations"]) - len(kept_anns),
            sorted(removed_ids),
        )
    categories = [c for c in data["categories"] if c["id"] not in removed_ids]
    if not categories:
        raise ValueError("no category left after removing background categories")
    converted = dict(data, annotations=kept_anns, categories=categories)
    return converted, removed


def sample_few_shot(data: dict, shots: int, seed: int = 0) -> dict:
    """A K-shot subset of a COCO detection dict: for each category (in id order), images holding it
    are drawn at random (``seed``) until the category appears in at least ``shots`` chosen images;
    every annotation of a chosen image is kept. (GLIP/FIBER's own sampler is not in the spec; this
    per-category image rule is our choice.)

    Raises:
        ValueError: ``shots`` < 1.
    """
    import random

    if shots < 1:
        raise ValueError(f"--shots must be at least 1, got {shots}")
    rng = random.Random(seed)
    by_cat: dict = {}
    for a in data["annotations"]:
        by_cat.setdefault(a["category_id"], set()).add(a["image_id"])
    chosen: set = set()
    for cat in sorted(c["id"] for c in data["categories"]):
        images = sorted(by_cat.get(cat, ()))
        have = len(chosen.intersection(images))
        rng.shuffle(images)
        for image_id in images:
            if have >= shots:
                break
            if image_id not in chosen:
                chosen.add(image_id)
                have += 1
    return dict(
        data,
        images=[im for im in data["images"] if im["id"] in chosen],
        annotations=[a for a in data["annotations"] if a["image_id"] in chosen],
    )


def few_shot_name(output_name: str, shots: int, seed: int) -> str:
    """``annotations_without_background.json`` -> ``..._{shots}shot_seed{seed}.json``."""
    stem, _, ext = output_name.rpartition(".")
    return f"{stem}_{shots}shot_seed{seed}.{ext}"


def convert_file(src: Path, output_name: str = OUTPUT_NAME, overwrite: bool = False) -> Path:
    """Convert one annotation file; the result is written next to it.

    Args:
        src: a Roboflow COCO json.
        output_name: file name of the result.
        overwrite: replace an existing result.

    Returns:
        the written (or already existing) path.
    """
    dst = src.with_name(output_name)
    if dst == src:
        raise ValueError(f"{src}: output name equals the input name")
    if dst.exists() and not overwrite:
        logger.info("%s exists; skipped (use --overwrite)", dst)
        return dst
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    converted, removed = remove_background_categories(data)
    logger.info("%s: removed %s", src, [c.get("name") for c in removed])
    with write_whole(str(dst), "w", encoding="utf-8") as f:  # a killed run leaves no partial file
        json.dump(converted, f, ensure_ascii=False)
    return dst


def find_inputs(paths: List[str]) -> List[Path]:
    """Expand directories to the Roboflow annotation files below them.

    Args:
        paths: json files or directories.

    Returns:
        sorted list of json paths.
    """
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(p.rglob(INPUT_NAME))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return found


def main(argv: List[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help=f"json files or directories holding {INPUT_NAME}")
    parser.add_argument("--output-name", default=OUTPUT_NAME, help="name of each written file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--shots", type=int, default=0, help="also write a K-shot train subset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the K-shot sampling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        inputs = find_inputs(args.paths)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if not inputs:
        logger.error("no %s found under %s", INPUT_NAME, args.paths)
        return 1
    for src in tqdm(inputs, desc="ODinW", unit="file"):
        try:
            dst = convert_file(src, args.output_name, args.overwrite)
            if args.shots and src.parent.name == "train":
                with open(dst, encoding="utf-8") as f:
                    subset = sample_few_shot(json.load(f), args.shots, args.seed)
                out = dst.with_name(few_shot_name(args.output_name, args.shots, args.seed))
                with write_whole(str(out), "w", encoding="utf-8") as f:
                    json.dump(subset, f, ensure_ascii=False)
                n_images = len(subset["images"])
                logger.info("%s: %d-shot subset, %d images", out, args.shots, n_images)
        except (OSError, ValueError, KeyError, TypeError) as e:  # an unreadable or odd export
            detail = str(e)
            if isinstance(e, KeyError):  # a message of this tool's own, or a bare field name
                named = e.args and " " in str(e.args[0])
                detail = str(e.args[0]) if named else f"a record has no field {e}"
            sys.exit(f"error: {src}: {' '.join(detail.split())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
