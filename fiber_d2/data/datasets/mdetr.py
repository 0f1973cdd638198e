"""MDETR-format grounding data: Flickr30k entities, RefCOCO/+/g, mixed GoldG, shapes.

MDETR json: ``images`` has one entry per (image, caption) with ``id`` (unique),
``file_name``, ``height``, ``width``, ``caption``, optional ``tokens_positive_eval`` (one list
of char spans per phrase, Flickr) and ``original_img_id`` (Flickr/GoldG) or ``original_id``
(refexp); ``annotations`` hold ``bbox`` (xywh), ``tokens_positive`` (char spans),
``category_id``, ``iscrowd``.

Records (the contract with the mapper, model and evaluators)::

    {"file_name", "height", "width", "image_id", "original_image_id", "caption",
     "task": "grounding" | "refexp", "dataset_name",
     "annotations": [{"bbox", "bbox_mode", "category_id": 0, "phrase_index",
                      "tokens_positive", "iscrowd"}],
     "phrases": [{"text", "tokens_positive", "boxes" (absolute xyxy), "phrase_type"}]}

plus ``sentence_id`` and ``source`` (the entry's own ``dataset_name``, GoldG) when the entry has
them.

Phrases are the entries of ``tokens_positive_eval`` when present; annotations whose spans
match none of them (GoldG, RefCOCO without the eval field) add a phrase per distinct span set.
An annotation's ``phrase_index`` is the first phrase it matches (the label); its box is listed
under every phrase it matches (Flickr boxes merged across coreferent phrases).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .common import (
    RecordFilter,
    box_problem,
    json_object_list,
    span_problem,
    warn_unlisted_image_ids,
)

__all__ = ["MDETR_TASKS", "load_mdetr_json", "register_mdetr_grounding"]

logger = logging.getLogger(__name__)

MDETR_TASKS = ("grounding", "refexp")
_DEFAULT_EVALUATOR = {"grounding": "flickr", "refexp": "refexp"}

ImageRoot = Union[str, Mapping[str, str]]


def _image_root_for(image_root: ImageRoot, entry: dict) -> str:
    if isinstance(image_root, str):
        return image_root
    source = entry.get("dataset_name")
    if source in image_root:
        return image_root[source]
    if "*" in image_root:
        return image_root["*"]
    raise KeyError(f"no image root for source {source!r}; image_root keys: {sorted(image_root)}")


def _overlap(a: List[List[int]], b: List[List[int]]) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def _type_names(value) -> Union[str, List[str]]:
    """A phrase's type as names: "clothing", or a list of names for several (never a repr)."""
    if isinstance(value, (list, tuple)):
        names = [str(v) for v in value]
        return names[0] if len(names) == 1 else names
    return str(value)


def _convert_entry(
    entry: dict, anns: List[dict], image_root: ImageRoot, task: str, dropped: List[str]
) -> Tuple[Optional[dict], Optional[str]]:
    """One MDETR image entry -> (record, None) or (None, reason it is bad); the reasons of
    annotations dropped from a kept entry are appended to ``dropped``."""
    caption = entry.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return None, "empty caption"
    try:
        width, height = int(entry["width"]), int(entry["height"])
        file_name = os.path.join(_image_root_for(image_root, entry), entry["file_name"])
    except (KeyError, TypeError, ValueError) as e:
        return None, f"bad image fields ({e!r})"
    phrase_types = entry.get("phrase_types") or []
    phrases: List[dict] = []

    def add_phrase(spans: List[List[int]]) -> int:
        k = len(phrases)
        phrases.append(
            {
                "text": " ".join(caption[s:e] for s, e in spans),
                "tokens_positive": spans,
                "boxes": [],
                "phrase_type": _type_names(phrase_types[k]) if k < len(phrase_types) else "unknown",
            }
        )
        return k

    for spans in entry.get("tokens_positive_eval") or []:
        problem = span_problem(spans, caption)
        if problem:
            return None, f"tokens_positive_eval: {problem}"
        add_phrase([[int(s), int(e)] for s, e in spans])

    annotations = []
    for a in anns:
        spans = a.get("tokens_positive")
        problem = span_problem(spans, caption)
        if problem:  # the annotation is dropped, the entry kept
            dropped.append(f"annotation {a.get('id')}: {problem}")
            continue
        spans = [[int(s), int(e)] for s, e in spans]
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            dropped.append(f"annotation {a.get('id')}: bbox {a.get('bbox')!r} is not xywh")
            continue
        xyxy = [x, y, x + w, y + h]  # absolute xyxy, no legacy -1 (evaluation convention)
        problem = box_problem(xyxy, width, height)
        if problem:
            dropped.append(f"annotation {a.get('id')}: {problem}")
            continue
        keys = {tuple(s) for s in spans}
        matches = [
            i for i, p in enumerate(phrases) if keys & {tuple(s) for s in p["tokens_positive"]}
        ]
        if not matches:
            matches = [i for i, p in enumerate(phrases) if _overlap(p["tokens_positive"], spans)]
        if not matches:
            matches = [add_phrase(spans)]
        for i in matches:
            phrases[i]["boxes"].append(list(xyxy))
        annotations.append(
            {
                "bbox": [x, y, w, h],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 0,
                "phrase_index": matches[0],
                "tokens_positive": spans,
                "iscrowd": int(a.get("iscrowd", 0)),
            }
        )
    if not phrases:
        return None, "no phrase (neither tokens_positive_eval nor annotations)"
    original = entry.get("original_img_id", entry.get("original_id", entry["id"]))
    record = {
        "file_name": file_name,
        "height": height,
        "width": width,
        "image_id": entry["id"],
        "original_image_id": original,
        "caption": caption,
        "task": task,
        "annotations": annotations,
        "phrases": phrases,
    }
    for key in ("sentence_id",):
        if key in entry:
            record[key] = entry[key]
    if "dataset_name" in entry:
        record["source"] = entry["dataset_name"]
    return record, None


def load_mdetr_json(
    json_file: str, image_root: ImageRoot, dataset_name: str, task: str = "grounding"
) -> List[dict]:
    """Load an MDETR-format json into grounding/refexp records (see the module docstring).

    Bad entries (empty caption, an evaluation span outside the caption, no phrase left) are
    skipped with a warning each; a bad annotation (span outside the caption, box outside the
    image) is dropped with a counted warning and its entry kept; a ValueError is raised when no
    entry is valid.

    Args:
        json_file: MDETR annotation json.
        image_root: image directory, or ``{source dataset_name: directory}`` with an optional
            ``"*"`` fallback (GoldG mixes COCO and VG/GQA images).
        dataset_name: registered name, stored as ``record["dataset_name"]``.
        task: "grounding" or "refexp".

    Returns:
        list of records, one per image entry (caption / expression).
    """
    if task not in MDETR_TASKS:
        raise ValueError(f"task {task!r} is not one of {MDETR_TASKS}")
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data:
        raise KeyError(f"{json_file}: no 'images' list; not an MDETR/COCO-format json")
    json_object_list(data["images"], "images", json_file)
    anns_by_entry: Dict[object, List[dict]] = defaultdict(list)
    for a in json_object_list(data.get("annotations", []), "annotations", json_file):
        anns_by_entry[a["image_id"]].append(a)
    warn_unlisted_image_ids(json_file, anns_by_entry, data["images"], "boxes")
    bad = RecordFilter(dataset_name, json_file)
    ids = set()
    records = []
    for entry in data["images"]:
        what = f"entry {entry.get('id')} ({entry.get('file_name')})"
        if entry.get("id") in ids:
            bad.skip(what, "duplicate image id")
            continue
        dropped: List[str] = []
        record, problem = _convert_entry(
            entry, anns_by_entry.get(entry.get("id"), []), image_root, task, dropped
        )
        if problem:
            bad.skip(what, problem + (f" ({dropped[0]})" if dropped else ""))
            continue
        if dropped:
            bad.drop(what, len(dropped), dropped[0])
        ids.add(entry["id"])
        record["dataset_name"] = dataset_name
        records.append(record)
    return bad.finish(records)


def register_mdetr_grounding(
    name: str,
    json_file: str,
    image_root: ImageRoot,
    task: str = "grounding",
    *,
    evaluator_type: Optional[str] = None,
    prepare: Optional[Callable[[], object]] = None,
    finish: Optional[Callable[[List[dict]], List[dict]]] = None,
) -> None:
    """Register an MDETR-format set (Flickr30k separate-GT, RefCOCO/+/g, GoldG, shapes).

    Args:
        name: dataset name.
        json_file: MDETR annotation json (read on first load only).
        image_root: image directory or ``{source: directory}`` mapping.
        task: "grounding" (Flickr-style phrases) or "refexp" (one box per expression).
        evaluator_type: defaults to "flickr" for grounding and "refexp" for refexp.
        prepare: optional callable run before loading (e.g. generating the data).
        finish: optional callable given the loaded records, returning the records to serve (e.g.
            the Flickr30k Entities ground truth).
    """
    if task not in MDETR_TASKS:
        raise ValueError(f"task {task!r} is not one of {MDETR_TASKS}")

    def load() -> List[dict]:
        if prepare is not None:
            prepare()
        records = load_mdetr_json(json_file, image_root, name, task)
        return records if finish is None else finish(records)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root if isinstance(image_root, str) else dict(image_root),
        evaluator_type=evaluator_type or _DEFAULT_EVALUATOR[task],
        fiber_task=task,
    )
