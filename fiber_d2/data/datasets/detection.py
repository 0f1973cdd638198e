"""Object-detection datasets (COCO format, Objects365, ODinW, LVIS) used as grounding data.

Records are detectron2's COCO dicts (contiguous ``category_id``, ``bbox_mode``) plus
``"task": "detection"`` and ``"dataset_name"``; the mapper turns the category names into a
prompt. Metadata gains ``fiber_task = "detection"`` and ``category_prompts``, an optional
``{category_name: prompt text}`` override (default: the cleaned category name).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Callable, Dict, List, Mapping, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .common import BadRecordError, RecordFilter, box_problem, check_unique_image_ids

__all__ = [
    "load_grounding_coco_json",
    "finish_detection_records",
    "register_grounding_coco",
    "mark_detection_dataset",
]

logger = logging.getLogger(__name__)


def finish_detection_records(
    records: List[dict], dataset_name: str, source: str = ""
) -> List[dict]:
    """Tag detectron2 detection dicts for fiber_d2, drop bad boxes and bad records.

    A record is skipped (with a warning) when it has no file name or size. A box that is not
    usable (:func:`box_problem`: not finite, empty or outside the image) is dropped
    with a counted warning naming the file, and the image is kept with its other boxes; the COCO
    evaluator drops the same boxes from its ground truth.

    Args:
        records: detectron2 dataset dicts (``annotations`` with ``bbox``/``bbox_mode``).
        dataset_name: registered name, stored as ``record["dataset_name"]``.
        source: annotation file, for messages.

    Returns:
        the valid records with ``"task": "detection"`` and ``"dataset_name"`` added.
    """
    _check_categories(dataset_name, source)
    _check_prompt_names(dataset_name, source)
    bad = RecordFilter(dataset_name, source)
    kept = []
    for r in records:
        what = f"image {r.get('image_id')} ({r.get('file_name')})"
        if not r.get("file_name") or not r.get("width") or not r.get("height"):
            bad.skip(what, "missing file_name, width or height")
            continue
        annotations, problems = [], []
        for a in r.get("annotations", []):
            try:
                box = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                problem = box_problem(box, r["width"], r["height"])
            except (KeyError, TypeError, ValueError, AssertionError) as e:  # e.g. 3 numbers
                problem = f"unusable bbox {a.get('bbox')!r} ({type(e).__name__})"
            if problem:
                problems.append(problem)
            else:
                annotations.append(a)
        if problems:
            bad.drop(what, len(problems), problems[0])
            r["annotations"] = annotations
        r["task"] = "detection"
        r["dataset_name"] = dataset_name
        kept.append(r)
    return bad.finish(kept)


def _check_categories(dataset_name: str, source: str) -> None:
    """Categories as detectron2's COCO loader left them in the metadata.

    Two categories with one id: the loader keeps the last one's name for both and its boxes go to
    it, a silent relabelling, so it is one :class:`BadRecordError` line naming the id. Two ids with
    one name: both keep their boxes but read as the same phrase in the prompt, so the model cannot
    tell them apart; a warning names it.
    """
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("thing_classes", None)
    id_map = meta.get("thing_dataset_id_to_contiguous_id", None)
    if not classes:
        return
    if id_map is not None and len(id_map) < len(classes):
        # the loader enumerates the sorted ids with repeats: a repeated id maps to its last index
        unused = sorted(set(range(len(classes))) - set(id_map.values()))
        repeated = min(i for i, c in id_map.items() if c > unused[0])
        raise BadRecordError(
            f"{source or dataset_name}: category id {repeated} is given to more than one category "
            f"({len(classes) - len(id_map)} repeated id(s) in 'categories'); each needs its own id"
        )
    repeated_names = [name for name, count in Counter(classes).items() if count > 1]
    if repeated_names:
        logger.warning(
            "%s: %d category name(s) are used by more than one category id, first %r: their "
            "prompts read the same, so the model cannot tell them apart",
            source or dataset_name,
            len(repeated_names),
            repeated_names[0],
        )


def _check_coco_file(source: str) -> None:
    """What detectron2's COCO and LVIS loaders would take wrongly, or explain in another library's
    words, found in one more read of the file ``source`` before they run: a ``categories`` list that
    is missing or empty ("min() arg is an empty sequence"), image ids of mixed types ("'<' not
    supported between ..."), an image id given to two images or an image listed under two ids
    (:func:`check_unique_image_ids`). The read costs about 6 s for 200 MB on a 2-core machine, once
    per process and run. A source that is not a local json file is left to the loader.

    Raises:
        BadRecordError: one line naming the file.
    """
    if not source.endswith(".json") or not os.path.isfile(source):
        return
    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        return  # the loader's own error names the file
    if not data.get("categories"):
        raise BadRecordError(
            f"{source}: the 'categories' list is missing or empty; a detection file names at least "
            "one category"
        )
    images = data.get("images", [])
    kinds = sorted({type(image.get("id")).__name__ for image in images})
    if len(kinds) > 1:
        raise BadRecordError(
            f"{source}: image ids mix types ({', '.join(kinds)}); give every image an id of one type"
        )
    check_unique_image_ids(images, source)


def _check_prompt_names(dataset_name: str, source: str) -> None:
    """A prompt override (``category_prompts``) naming no category of the dataset is one
    :class:`BadRecordError` line: the mapper would silently keep the category's own name."""
    meta = MetadataCatalog.get(dataset_name)
    prompts = meta.get("category_prompts", None) or {}
    classes = meta.get("thing_classes", None)
    unknown = [name for name in prompts if classes is not None and name not in classes]
    if unknown:
        shown = ", ".join(repr(c) for c in classes[:8]) + (", ..." if len(classes) > 8 else "")
        raise BadRecordError(
            f"{source or dataset_name}: the prompt override names {unknown[0]!r}, which is not a "
            f"category of dataset '{dataset_name}' (its categories: {shown})"
        )


def load_grounding_coco_json(json_file: str, image_root: str, dataset_name: str) -> List[dict]:
    """Load a COCO-format detection json with detectron2's loader, tagged for grounding.

    Args:
        json_file: COCO instances json.
        image_root: directory of the images.
        dataset_name: registered name (its metadata gets ``thing_classes`` and
            ``thing_dataset_id_to_contiguous_id`` from the json).

    Returns:
        list of detection records (see :func:`finish_detection_records`).
    """
    from detectron2.data.datasets import load_coco_json

    _check_coco_file(json_file)
    records = load_coco_json(json_file, image_root, dataset_name)
    return finish_detection_records(records, dataset_name, json_file)


def register_grounding_coco(
    name: str,
    json_file: str,
    image_root: str,
    prompt: Optional[Mapping[str, str]] = None,
    *,
    prepare: Optional[Callable[[], object]] = None,
    metadata: Optional[Dict] = None,
) -> None:
    """Register a COCO-format detection set (COCO, Objects365, ODinW, ...) as grounding data.

    Args:
        name: dataset name.
        json_file: COCO instances json (read when the dataset is first loaded).
        image_root: image directory.
        prompt: optional ``{category_name: prompt text}`` replacing cleaned names in prompts.
        prepare: optional callable run before loading (e.g. generating the data).
        metadata: extra metadata fields (e.g. ``thing_classes`` known in advance).
    """

    def load() -> List[dict]:
        if prepare is not None:
            prepare()
        return load_grounding_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        fiber_task="detection",
        category_prompts=dict(prompt or {}),
        **(metadata or {}),
    )


def mark_detection_dataset(name: str, prompt: Optional[Mapping[str, str]] = None) -> bool:
    """Reuse an already registered detectron2 detection set (e.g. ``coco_2017_train``).

    Its loader is wrapped (not duplicated) so records carry ``task``/``dataset_name`` and bad
    records are skipped; its metadata gains ``fiber_task = "detection"``.

    Args:
        name: a registered dataset name.
        prompt: optional ``{category_name: prompt text}`` override.

    Returns:
        True if the dataset exists (and is now marked), False if it is not registered.
    """
    if name not in DatasetCatalog:
        return False
    loader = DatasetCatalog[name]  # the registered function itself (UserDict access)
    if getattr(loader, "_fiber_marked", False):
        if prompt is not None:
            MetadataCatalog.get(name).set(category_prompts=dict(prompt))
        return True

    def load() -> List[dict]:
        source = MetadataCatalog.get(name).get("json_file", "")
        _check_coco_file(source)
        return finish_detection_records(loader(), name, source)

    load._fiber_marked = True
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(fiber_task="detection", category_prompts=dict(prompt or {}))
    return True
