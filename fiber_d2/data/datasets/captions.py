"""Image-caption data for the coarse-grained stage (pre-training and retrieval evaluation).

Accepted files:

* json lines (``.jsonl``): one object per image with ``file_name`` and ``captions`` (list)
  or ``caption`` (str); optional ``image_id``, ``height``, ``width``, ``split``;
* Karpathy split json (``dataset_coco.json``): ``images[].filepath/filename/split/
  sentences[].raw`` (+ ``cocoid``);
* official COCO captions json: ``images[]`` (``id``, ``file_name``, size) and
  ``annotations[]`` (``image_id``, ``caption``).

Captions are kept as written (the original tokenizes the raw strings, surrounding whitespace
included) and exact duplicates per image are dropped (coarse spec 4); empty or blank captions are
skipped and counted (one warning with the total). Records::

    {"file_name", "image_id", "height"?, "width"?, "task": "caption", "dataset_name",
     "caption": str,             # one_per_caption=True (training: one sample per caption)
     "caption_index": int}       # the caption's position among its image's kept captions
     "captions": [str, ...]}     # one_per_caption=False (evaluation: one record per image)

``height``/``width`` are present when the file gives them; the mapper reads them from the
image otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .common import (
    BadRecordError,
    RecordFilter,
    check_unique_image_ids,
    json_object_list,
    warn_unlisted_image_ids,
)

__all__ = ["load_captions", "register_captions"]

logger = logging.getLogger(__name__)


def _read_jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid json line ({e})") from e
                if not isinstance(item, dict):
                    raise BadRecordError(
                        f"{path}:{line_no}: a line must be one json object per image, got a "
                        f"{type(item).__name__}"
                    )
                yield item


def _from_json(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise KeyError(f"{path}: expected an 'images' list (Karpathy or COCO captions json)")
    json_object_list(images, "images", path)
    if images and "sentences" in images[0]:  # Karpathy split file
        items = []
        for index, img in enumerate(images):
            sentences = json_object_list(
                img.get("sentences", []), f"images[{index}].sentences", path
            )
            items.append(
                {
                    "file_name": os.path.join(img.get("filepath", ""), img["filename"]),
                    "image_id": img.get("cocoid", img.get("imgid", index)),
                    "split": img.get("split"),
                    "captions": [s.get("raw", "") for s in sentences],
                }
            )
        # one id for two entries would merge their reference captions in the evaluation
        check_unique_image_ids(
            ({"id": item["image_id"], "file_name": item["file_name"]} for item in items), path
        )
        yield from items
        return
    if "annotations" not in data:
        raise KeyError(f"{path}: neither Karpathy 'sentences' nor COCO caption 'annotations'")
    check_unique_image_ids(images, path)
    by_image: Dict[object, List[str]] = defaultdict(list)
    for a in json_object_list(data["annotations"], "annotations", path):
        by_image[a["image_id"]].append(a.get("caption", ""))
    warn_unlisted_image_ids(path, by_image, images, "captions")
    for img in images:
        item = {
            "file_name": img["file_name"],
            "image_id": img["id"],
            "captions": by_image[img["id"]],
        }
        for key in ("height", "width"):
            if key in img:
                item[key] = img[key]
        yield item


def load_captions(
    path: str,
    image_root: str,
    dataset_name: str,
    *,
    splits: Optional[Sequence[str]] = None,
    one_per_caption: bool = True,
) -> List[dict]:
    """Load image-caption pairs (see the module docstring for formats and record layout).

    Images without any non-empty caption are skipped with a warning; a ValueError is raised
    when nothing valid remains.

    Args:
        path: ``.jsonl`` file, Karpathy json or COCO captions json.
        image_root: directory the file names are relative to.
        dataset_name: registered name, for messages and ``record["dataset_name"]``.
        splits: keep only items whose ``split`` is listed (Karpathy: "train", "val",
            "restval", "test"); None keeps all.
        one_per_caption: one record per caption (training) instead of one per image.

    Returns:
        list of caption records.
    """
    items = list(_read_jsonl(path) if path.endswith(".jsonl") else _from_json(path))
    if splits is not None and items and not any("split" in item for item in items):
        raise BadRecordError(
            f"dataset {dataset_name!r}: no item of {path} has a 'split' (the Karpathy "
            f"dataset_*.json release has one per image: {', '.join(splits)}, ...); is it another "
            "caption file?"
        )
    bad = RecordFilter(dataset_name, path)
    records = []
    empty = 0  # empty caption strings dropped
    for index, item in enumerate(items):
        if splits is not None and item.get("split") not in splits:
            continue
        what = f"image {item.get('image_id', index)} ({item.get('file_name')})"
        if not item.get("file_name"):
            bad.skip(what, "no file_name")
            continue
        raw = item.get("captions", item.get("caption"))
        raw = [raw] if isinstance(raw, str) else list(raw or [])
        captions = list(dict.fromkeys(c for c in raw if isinstance(c, str) and c.strip()))
        empty += sum(1 for c in raw if not (isinstance(c, str) and c.strip()))
        if not captions:
            bad.skip(what, "empty caption")
            continue
        base = {
            "file_name": os.path.join(image_root, item["file_name"]),
            "image_id": item.get("image_id", index),
            "task": "caption",
            "dataset_name": dataset_name,
        }
        for key in ("height", "width"):
            if item.get(key):
                base[key] = int(item[key])
        if one_per_caption:
            records.extend(
                {**base, "caption": c, "caption_index": k} for k, c in enumerate(captions)
            )
        else:
            records.append({**base, "captions": captions})
    if empty:
        logger.warning("%s: skipped %d empty captions (%s)", dataset_name, empty, path)
    return bad.finish(records)


def register_captions(
    name: str,
    jsonl_or_coco_captions_json: str,
    image_root: str,
    *,
    splits: Optional[Sequence[str]] = None,
    one_per_caption: bool = True,
    evaluator_type: str = "retrieval",
    prepare: Optional[Callable[[], object]] = None,
) -> None:
    """Register an image-caption set.

    Args:
        name: dataset name.
        jsonl_or_coco_captions_json: json-lines file, Karpathy json or COCO captions json.
        image_root: image directory.
        splits: Karpathy splits to keep (None: all).
        one_per_caption: one record per caption (training) or per image (evaluation).
        evaluator_type: metadata evaluator type.
        prepare: optional callable run before loading (e.g. generating the data).
    """

    def load() -> List[dict]:
        if prepare is not None:
            prepare()
        return load_captions(
            jsonl_or_coco_captions_json,
            image_root,
            name,
            splits=splits,
            one_per_caption=one_per_caption,
        )

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=jsonl_or_coco_captions_json,
        image_root=image_root,
        evaluator_type=evaluator_type,
        fiber_task="caption",
    )
