"""Flickr30k Entities ground truth for phrase-grounding evaluation (fine spec §5.1).

The original evaluates Flickr30k against the Entities release itself: ``Annotations/<image>.xml``
(boxes per entity id) and ``Sentences/<image>.txt`` (each sentence's phrases with their entity id
and types), under ``$DETECTRON2_DATASETS/flickr30k/flickr30k/``. MDETR's json, which fiber_d2's
records come from, holds the same boxes with two differences that can change a hit: within a
sentence, boxes of IoU >= 0.95 (of one entity or of several) are kept once, as the last of them, and
listed under every phrase of those entities; and it has no phrase types, so per-type recall reads
"unknown". :func:`entities_ground_truth` gives each evaluation record's phrases the boxes and types
of the Entities files.

Sentence file lines look like ``[/EN#18/people A man] in [/EN#19/clothing a blue shirt] ...``; a
phrase may have several types (``/EN#7/people/other``). XML objects carry a ``bndbox``
(``xmin``..``ymax``, pixels) and one ``name`` per entity id they belong to; objects without a box
(scene, not visible) are not ground truth.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import xml.etree.ElementTree as ET

__all__ = ["read_sentences", "read_entity_boxes", "entities_ground_truth", "has_entities"]

logger = logging.getLogger(__name__)


def read_sentences(path: str) -> list[list[dict]]:
    """Phrases of each sentence of a Sentences file.

    Args:
        path: ``Sentences/<image>.txt``.

    Returns:
        per sentence (file order), its phrases in order: ``{"text", "entity_id" (int),
        "types" (list of str)}``.

    Raises:
        ValueError: a malformed phrase, naming the file and line.
    """
    sentences = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({e.reason})") from e
            if not line.strip():
                continue
            phrases, words = [], None
            for token in line.split():
                if words is None and token.startswith("[/EN#"):
                    head = token[len("[/EN#") :].split("/")
                    if len(head) < 2 or not head[0].isdigit():
                        raise ValueError(f"{path}:{number}: malformed phrase tag {token!r}")
                    phrases.append({"entity_id": int(head[0]), "types": head[1:], "words": []})
                    words = phrases[-1]["words"]
                elif words is not None:
                    words.append(token[:-1] if token.endswith("]") else token)
                    if token.endswith("]"):
                        words = None
            if words is not None:
                raise ValueError(f"{path}:{number}: a phrase is not closed with ']'")
            sentences.append(
                [
                    {"text": " ".join(p["words"]), "entity_id": p["entity_id"], "types": p["types"]}
                    for p in phrases
                ]
            )
    return sentences


def read_entity_boxes(path: str) -> dict[int, list[list[float]]]:
    """Boxes of each entity of an Annotations file.

    Args:
        path: ``Annotations/<image>.xml``.

    Returns:
        ``{entity id: [[xmin, ymin, xmax, ymax], ...]}`` in file order; entities without a box are
        absent.

    A box with a coordinate that is not finite, or with xmax < xmin or ymax < ymin, is no box: it is
    left out, with one warning per file (the MDETR json's loader drops such boxes too). Boxes of zero
    width or height are kept, as the original's evaluation keeps every box of the file.

    Raises:
        ValueError: unreadable XML, a box with a missing / non-numeric coordinate or an entity
            name that is not an id, naming the file.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not readable XML ({e})") from e
    boxes: dict[int, list[list[float]]] = {}
    bad = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None or len(box) == 0:
            continue
        try:
            xyxy = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: a bndbox has a missing or non-numeric coordinate") from e
        if not all(math.isfinite(v) for v in xyxy) or xyxy[2] < xyxy[0] or xyxy[3] < xyxy[1]:
            bad.append(xyxy)
            continue
        for name in obj.findall("name"):
            if not (name.text or "").strip().isdigit():
                raise ValueError(f"{path}: entity name {name.text!r} is not an entity id")
            boxes.setdefault(int(name.text), []).append(xyxy)
    if bad:
        logger.warning(
            "%s: %d box(es) left out of the ground truth: a coordinate is not finite or a side is "
            "negative (first: %s)",
            path,
            len(bad),
            bad[0],
        )
    return boxes


def has_entities(root: str) -> bool:
    """True when ``root`` holds the Entities release's ``Annotations`` and ``Sentences`` folders."""
    return all(os.path.isdir(os.path.join(root, d)) for d in ("Annotations", "Sentences"))


def entities_ground_truth(records: list[dict], root: str) -> list[dict]:
    """Give each record's phrases the boxes and types of the Entities files (in place).

    A record is one (image, sentence) of MDETR's json: its ``phrases`` are the sentence's phrases
    whose entity has a box, in sentence order, as the Entities phrases with a box are.

    Args:
        records: :func:`~fiber_d2.data.datasets.mdetr.load_mdetr_json` records with
            ``original_image_id`` and ``sentence_id``.
        root: folder with ``Annotations/`` and ``Sentences/``.

    Returns:
        ``records``.

    Raises:
        ValueError: a record without ``sentence_id``, a missing file, or phrases that do not match
            (count or text), naming the record and the file.
    """

    @functools.lru_cache(maxsize=64)
    def image_files(image: str):
        sentences = os.path.join(root, "Sentences", f"{image}.txt")
        annotations = os.path.join(root, "Annotations", f"{image}.xml")
        for path in (sentences, annotations):
            if not os.path.isfile(path):
                raise ValueError(f"Flickr30k Entities file missing: {path}")
        return sentences, read_sentences(sentences), read_entity_boxes(annotations)

    for record in records:
        what = f"record {record.get('image_id')} ({record.get('file_name')})"
        if "sentence_id" not in record:
            raise ValueError(f"{what}: no sentence_id to find its Entities sentence")
        path, sentences, boxes = image_files(str(record["original_image_id"]))
        k = int(record["sentence_id"])
        if not 0 <= k < len(sentences):
            raise ValueError(f"{what}: sentence {k} not in {path} ({len(sentences)} sentences)")
        boxed = [p for p in sentences[k] if p["entity_id"] in boxes]
        phrases = record["phrases"]
        if len(boxed) != len(phrases):
            raise ValueError(
                f"{what}: {len(phrases)} phrases, but sentence {k} of {path} has {len(boxed)}"
                " phrases with boxes"
            )
        for phrase, entity in zip(phrases, boxed):
            if phrase["text"] != entity["text"]:
                raise ValueError(
                    f"{what}: phrase {phrase['text']!r} is {entity['text']!r} in sentence {k} of"
                    f" {path}"
                )
            phrase["boxes"] = [list(b) for b in boxes[entity["entity_id"]]]
            types = entity["types"]
            phrase["phrase_type"] = types[0] if len(types) == 1 else list(types)
    return records
