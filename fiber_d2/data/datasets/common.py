"""Helpers shared by the dataset loaders: bad-record bookkeeping, record checks, and the checks a
run makes on its datasets before it writes anything (:func:`check_datasets_before_run`)."""

from __future__ import annotations

import logging
import math
import os
from typing import Iterable, List, Optional, Sequence

from PIL import Image

__all__ = [
    "BadRecordError",
    "IMAGE_READ_ERRORS",
    "record_files",
    "RecordFilter",
    "box_problem",
    "span_problem",
    "check_unique_image_ids",
    "json_object_list",
    "warn_unlisted_image_ids",
    "filter_training_images",
    "no_usable_box",
    "check_datasets_before_run",
    "counts_unreadable_as_empty",
    "load_records",
    "read_arrow_rows",
    "serve_once",
]

logger = logging.getLogger(__name__)

# what reading an image file raises when it is missing, truncated, corrupt or too large to decode
# (PIL's DecompressionBombError, above twice Image.MAX_IMAGE_PIXELS, is none of the others)
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class RecordFilter:
    """Skips bad records of one dataset: one warning each, a summary, an error if none remain.

    Args:
        dataset_name: registered name, used in messages.
        source: file the records come from, used in messages.
    """

    def __init__(self, dataset_name: str, source: str = "") -> None:
        self.dataset_name = dataset_name
        self.source = source
        self.skipped = 0
        self.dropped = 0  # annotations dropped from kept records

    def skip(self, what: str, reason: str) -> None:
        """Record one skipped record, with a warning naming it.

        Args:
            what: the record (e.g. "image 12 (a.jpg)").
            reason: why it is skipped.
        """
        self.skipped += 1
        logger.warning("%s: skipping %s: %s", self.dataset_name, what, reason)

    def drop(self, what: str, count: int, reason: str) -> None:
        """Record ``count`` annotations dropped from a kept record, with a counted warning.

        Args:
            what: the record (e.g. "image 12 (a.jpg)").
            count: annotations dropped.
            reason: why (the first one's reason).
        """
        self.dropped += count
        logger.warning(
            "%s: %s: dropped %d bad annotation(s), image kept: %s (%d dropped so far)",
            self.dataset_name,
            what,
            count,
            reason,
            self.dropped,
        )

    def finish(self, records: List[dict]) -> List[dict]:
        """Log the skip count and return the kept records.

        Args:
            records: the valid records.

        Returns:
            ``records``; raises BadRecordError (a ValueError) when it is empty.
        """
        if self.dropped:
            logger.warning(
                "%s: dropped %d bad annotation(s) in all, their images kept (%s)",
                self.dataset_name,
                self.dropped,
                self.source,
            )
        if self.skipped:
            logger.warning(
                "%s: skipped %d of %d records (%s)",
                self.dataset_name,
                self.skipped,
                self.skipped + len(records),
                self.source,
            )
        if not records:
            raise BadRecordError(
                f"dataset {self.dataset_name!r}: no valid record in {self.source or 'its source'}"
                f" ({self.skipped} skipped)"
            )
        return records


def box_problem(xyxy: Sequence[float], width: float, height: float) -> Optional[str]:
    """Why an absolute xyxy box cannot belong to a ``width`` x ``height`` image, or None.

    A box is bad when a coordinate is not finite, when its width or height is not positive, or
    when it does not overlap the image at all. A box that extends beyond the image is usable, however
    far: the mapper clips it to the image, as the original clamps it (its grounding and detection
    loaders remove only the boxes that clamping leaves empty). The loaders drop bad boxes (the image
    is kept) and the COCO evaluator drops the same boxes from its ground truth, so training and
    evaluation agree.

    Args:
        xyxy: (x1, y1, x2, y2).
        width: image width.
        height: image height.

    Returns:
        a short reason, or None for a usable box.
    """
    if len(xyxy) != 4 or not all(math.isfinite(float(v)) for v in xyxy):
        return f"box {list(xyxy)} is not 4 finite numbers"
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if x2 <= x1 or y2 <= y1:
        return f"box {[x1, y1, x2, y2]} has a non-positive width or height"
    if max(x1, x2) <= 0 or max(y1, y2) <= 0 or min(x1, x2) >= width or min(y1, y2) >= height:
        return f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} image"
    return None


def span_problem(spans, text: str) -> Optional[str]:
    """Why a list of ``[start, end)`` char spans does not fit ``text``, or None.

    Args:
        spans: list of [start, end) pairs.
        text: the caption.

    Returns:
        a short reason, or None when every span is inside the text and non-empty.
    """
    if not isinstance(spans, (list, tuple)) or not spans:
        return f"no char span ({spans!r})"
    for span in spans:
        if not isinstance(span, (list, tuple)) or len(span) != 2:
            return f"span {span!r} is not a [start, end) pair"
        s, e = span
        if not (isinstance(s, int) and isinstance(e, int)) or not 0 <= s < e <= len(text):
            return f"span {list(span)} is outside the caption (length {len(text)})"
    return None


def json_object_list(entries: object, what: str, path: str) -> list:
    """``entries`` (a file's ``images`` or ``annotations``) as a list of json objects, or one
    :class:`BadRecordError` line naming the file and the first entry that is not one."""
    if not isinstance(entries, list):
        raise BadRecordError(f"{path}: '{what}' must be a list, got a {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadRecordError(
                f"{path}: {what}[{index}] must be a json object, got {type(entry).__name__} "
                f"{entry!r:.60}"
            )
    return entries


def warn_unlisted_image_ids(path: str, image_ids: Iterable, images: list, what: str) -> None:
    """One warning counting the ``image_ids`` (those of a file's annotations) that no entry of its
    ``images`` list has: their ``what`` ("captions", "boxes") are not used.

    Args:
        path: the file, for the message.
        image_ids: the annotations' image ids.
        images: the file's ``images`` entries (json objects with ``id``).
        what: what the annotations hold.
    """
    unlisted = set(image_ids) - {image.get("id") for image in images}
    if unlisted:
        logger.warning(
            "%s: %s of %d image id(s) that 'images' does not list are not used (first: %r)",
            path,
            what,
            len(unlisted),
            sorted(unlisted, key=repr)[0],
        )


def check_unique_image_ids(images: Iterable[dict], source: str) -> None:
    """Two entries of a COCO-format ``images`` list with one ``id`` (e.g. two files concatenated
    whose ids overlap): pycocotools, the LVIS API and the caption reader keep one file name for the
    id and give it the annotations of both, a silent mislabelling. One ``file_name`` under two ids:
    the image is trained, or evaluated, twice (with the boxes of one entry only, the other's
    predictions count as false positives). Either is one :class:`BadRecordError` line.

    Args:
        images: the file's ``images`` entries (``id``, ``file_name``; LVIS has no file names).
        source: the file, for the message.
    """
    name_of: dict = {}
    id_of: dict = {}
    for image in images:
        image_id, name = image.get("id"), image.get("file_name")
        if image_id in name_of:
            raise BadRecordError(
                f"{source}: image id {image_id!r} is given to more than one image "
                f"({name_of[image_id]} and {name}); each image needs its own id"
            )
        if name is not None and name in id_of:
            raise BadRecordError(
                f"{source}: image {name} is listed twice, as ids {id_of[name]!r} and {image_id!r}; "
                "list each image once"
            )
        name_of[image_id] = name
        if name is not None:
            id_of[name] = image_id


def filter_training_images(records: List[dict]) -> List[dict]:
    """The training images the original keeps (maskrcnn-benchmark's ``has_valid_annotation``, used by
    its detection and grounding datasets): those with at least one annotation, crowd ones included
    (an image with only crowd boxes trains as a negative once the mapper drops them), unless every
    box is at most 1 px wide or tall. detectron2's ``filter_empty`` keeps the latter and drops the
    former. Records without ``annotations`` (captions) are kept.

    Args:
        records: detectron2 records with ``annotations`` (``bbox`` and ``bbox_mode``).

    Returns:
        the kept records, in order.
    """
    from detectron2.structures import BoxMode

    def larger_than_a_pixel(a: dict) -> bool:
        box, mode = a["bbox"], a["bbox_mode"]
        if mode == BoxMode.XYXY_ABS:
            w, h = box[2] - box[0], box[3] - box[1]
        elif mode == BoxMode.XYWH_ABS:
            w, h = box[2], box[3]
        else:
            w, h = BoxMode.convert(list(box), mode, BoxMode.XYWH_ABS)[2:]
        return w > 1 and h > 1

    def usable(record: dict) -> bool:
        annotations = record.get("annotations")
        if annotations is None:
            return True
        return any(larger_than_a_pixel(a) for a in annotations)

    kept = [r for r in records if usable(r)]
    if len(kept) < len(records):
        logger.info(
            "Training images: removed %d of %d without annotations or with only boxes of at most "
            "1 px (as the original)",
            len(records) - len(kept),
            len(records),
        )
    return kept


class BadRecordError(ValueError):
    """A one-line, user-facing error about a dataset or one of its records (naming it)."""


def record_files(record: dict) -> List[str]:
    """The image files of a record: ``file_name``, or ``file_name_0``, ``file_name_1``, ... (an
    NLVR2 pair); none for records whose images live elsewhere (the original's Arrow files)."""
    if record.get("file_name"):
        return [record["file_name"]]
    files = []
    while record.get(f"file_name_{len(files)}"):
        files.append(record[f"file_name_{len(files)}"])
    return files


def _record_label(record: dict) -> str:
    """How a message names a record: its NLVR2 identifier, VQA question or image id."""
    for key, label in (("identifier", "NLVR2 record"), ("question_id", "question")):
        if key in record:
            return f"{label} {record[key]}"
    return f"image {record.get('image_id', '?')}"


def _first_readable(records: Iterable[dict]) -> tuple[bool, str]:
    """(True, "") at the first record whose images decode, else (False, first failure)."""
    from detectron2.data.detection_utils import read_image

    first = ""
    for record in records:
        paths = record_files(record)
        if not paths:
            return True, ""  # records without files (nothing to check)
        try:
            for path in paths:
                read_image(path, format="RGB")
            return True, ""
        except IMAGE_READ_ERRORS as e:
            first = first or f"{path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
    return False, first


# record tasks of the detector's mapper, which refuses an image whose size is not the record's
FINE_TASKS = ("detection", "grounding", "refexp")


def _undecodable(records: Iterable[dict], exif_orientation: bool = False) -> str:
    """The first image file (in dataset order) that is missing, does not decode in full, or, for a
    detector record (:data:`FINE_TASKS`), whose size (after the EXIF turn with
    ``exif_orientation``, as the mapper reads it) is not the record's ``width`` x ``height``: the
    evaluation would stop at it after the whole run. "<file> (<record>): <reason>", the record
    named as in :func:`_record_label` (the first one that reads the file); "" when all are fine.

    Truncated files are found too (PIL refuses a truncated image on ``load``). The images are decoded
    in threads (PIL releases the GIL while decoding): a cost of one extra decode per test image,
    small next to the model's forward on it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ExifTags

    def problem(item) -> str:
        """What is wrong with one file ("" when nothing is)."""
        path, size = item
        if not os.path.isfile(path):
            return "no such file"
        try:
            with Image.open(path) as im:
                im.load()
                stored = im.size
                # EXIF orientations 5-8 turn the image by 90 degrees (no need to turn its pixels)
                if exif_orientation and im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):
                    stored = stored[::-1]
        except IMAGE_READ_ERRORS as e:
            return (str(e).strip().splitlines() or [type(e).__name__])[0]
        if size is not None and size != stored:
            (w, h), (rw, rh) = stored, size
            return f"the image is {h}x{w} (height x width), the record says {rh}x{rw}"
        return ""

    sizes: dict = {}
    labels: dict = {}  # path -> the first record that reads it, as messages name records
    for r in records:
        # the detector's records are checked against their size (its mapper refuses another)
        fine = r.get("task") in FINE_TASKS and r.get("width") and r.get("height")
        for path in record_files(r):
            sizes.setdefault(path, (int(r["width"]), int(r["height"])) if fine else None)
            labels.setdefault(path, _record_label(r))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for path, found in zip(sizes, pool.map(problem, sizes.items())):
            if found:
                return f"{path} ({labels[path]}): {found}"
    return ""


def serve_once(name: str, records: List[dict]) -> None:
    """Let the next ``DatasetCatalog.get(name)`` return ``records`` without reading them again;
    the registered loader is back in place right after."""
    from detectron2.data import DatasetCatalog

    loader = DatasetCatalog[name]

    def load_once() -> List[dict]:
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        return records

    for attr in ("_fiber_marked",):
        if hasattr(loader, attr):
            setattr(load_once, attr, getattr(loader, attr))
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load_once)


# the evaluators that score an unreadable test image as one without predictions
# (TEST.UNREADABLE_IMAGE_AS_EMPTY): the detection and grounding ones
UNREADABLE_AS_EMPTY_EVALUATORS = ("coco", "lvis", "flickr", "refexp")


def counts_unreadable_as_empty(name: str) -> bool:
    """Whether the evaluator of test dataset ``name`` can count an unreadable image as one without
    predictions (``TEST.UNREADABLE_IMAGE_AS_EMPTY``)."""
    from detectron2.data import MetadataCatalog

    return MetadataCatalog.get(name).get("evaluator_type", None) in UNREADABLE_AS_EMPTY_EVALUATORS


def load_records(name: str, role: str) -> list:
    """``DatasetCatalog.get(name)``; an annotation file that is missing or unreadable (not JSON, a
    folder, no permission, a record without a required field) is one :class:`BadRecordError` line
    naming the dataset and the file.

    Args:
        name: registered dataset.
        role: what the set is for ("training", "test", ...), for the message.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    try:
        return DatasetCatalog.get(name)
    except BadRecordError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        AssertionError,
        ImportError,
    ) as e:
        # TypeError / AssertionError: pycocotools' and detectron2's checks of a malformed file
        # (a top-level list, duplicate annotation ids, image ids of mixed types, ...);
        # AttributeError: a value of another json type than the format's (a string for a list);
        # ImportError: a reader's optional dependency (pyarrow for the original's Arrow files)
        source = MetadataCatalog.get(name).get("json_file", "")
        text = e.args[0] if isinstance(e, KeyError) and e.args else None
        if isinstance(text, str) and " " not in text.strip():
            # a hand-made file without a field the format requires
            detail = f"a record has no field {e}"
        elif isinstance(e, AttributeError):
            detail = f"a value is not of the type the format requires ({e})"
        elif isinstance(e, KeyError):  # a KeyError that carries a sentence (detectron2's)
            detail = " ".join(str(text).split())
        else:
            detail = " ".join(str(e).split()) or type(e).__name__
        if source and source not in detail:
            detail = f"{source}: {detail}"
        if isinstance(e, FileNotFoundError):
            detail += (
                " (the built-in datasets are read under $DETECTRON2_DATASETS, default ./datasets)"
            )
        raise BadRecordError(
            f"{role} dataset '{name}': cannot load its annotations: {detail}"
        ) from e


def _open_arrow(path: str):
    """The table of an Arrow IPC file (pyarrow is optional: imported here)."""
    import pyarrow as pa

    with pa.memory_map(path, "r") as source:
        return pa.ipc.open_file(source).read_all()


def read_arrow_rows(path: str, required: Sequence[str], read: Sequence[str], what: str) -> list:
    """The rows of one of the original's Arrow files (coarse spec §7), as dicts of the columns in
    ``read`` that the file has. A missing file, a folder, an empty or truncated file, a file without
    one of the ``required`` columns, or pyarrow not installed is one line naming the file.

    Args:
        path: the ``.arrow`` file.
        required: the columns the file must have (image columns too: checked, not read).
        read: the columns returned (those the file lacks are left out of the rows).
        what: the dataset kind ("VQA", "NLVR2"), for the messages.

    Raises:
        FileNotFoundError / IsADirectoryError / ValueError / ImportError naming the file.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} arrow file {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} arrow file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the {what} arrow file is empty")
    try:
        table = _open_arrow(path)
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid ("Not an Arrow file") / IOError
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path}: not a readable {what} arrow file ({detail})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: the {what} arrow file has no column {', '.join(missing)} (it has "
            f"{', '.join(table.column_names) or 'none'})"
        )
    return table.select([c for c in read if c in table.column_names]).to_pylist()


def no_usable_box(train: Sequence[str]) -> "BadRecordError":
    """The error of training sets of which :func:`filter_training_images` keeps no image."""
    return BadRecordError(
        f"training datasets {tuple(train)}: no image with a usable box "
        "(DATALOADER.FILTER_EMPTY_ANNOTATIONS drops images without one)"
    )


def check_datasets_before_run(
    train: Sequence[str],
    test: Sequence[str],
    *,
    check_test_files: bool = True,
    exif_orientation: bool = False,
    filter_empty_annotations: bool = False,
) -> None:
    """Checks made before a run writes anything to its ``OUTPUT_DIR``.

    * every dataset's annotations load (a missing or malformed file is one line naming it);
    * with ``filter_empty_annotations`` (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``), the training sets
      keep at least one image (:func:`filter_training_images`), as the training loader needs;
    * no training dataset is a per-image caption set (evaluation records with all captions);
    * every training image file exists (one ``stat`` each), and every training dataset has at least
      one readable image (images are decoded in order until one works, so a healthy set costs one
      decode);
    * with ``check_test_files``, every test image exists and decodes in full (truncated files
      included), and a detector record's image has the record's size (``exif_orientation``: as
      ``INPUT.EXIF_ORIENTATION`` turns it), so a bad test image stops the run before its
      ``OUTPUT_DIR`` is touched.

    Each set's records are handed to the run's first ``DatasetCatalog.get`` instead of being
    loaded twice.

    Raises:
        BadRecordError: one line naming the dataset (and a file).
    """
    kept_any = not filter_empty_annotations
    for name in train:
        records = load_records(name, "training")
        if records and isinstance(records[0].get("captions"), list):
            raise BadRecordError(
                f"training dataset '{name}' holds one record per image with all its captions (an "
                "evaluation split); training reads one caption per record: train on a per-caption "
                "registration (e.g. coco_caption_karpathy_train, which holds Karpathy train + val)"
            )
        first_record: dict = {}  # each file once (a grounding set has a record per caption)
        for r in records:
            for f in record_files(r):
                first_record.setdefault(f, r)
        missing = [f for f in first_record if not os.path.isfile(f)]
        if missing:  # the mappers of the image-text tasks would stop the run when they reach it
            path, record = missing[0], first_record[missing[0]]
            raise BadRecordError(
                f"training dataset '{name}': {len(missing)} image file(s) not found, first "
                f"{path} ({_record_label(record)}; fix the path under DETECTRON2_DATASETS or drop "
                "the records)"
            )
        ok, failure = _first_readable(records)
        if not ok:
            raise BadRecordError(
                f"training dataset '{name}': none of its {len(records)} images can be read "
                f"(first: {failure})"
            )
        kept_any = kept_any or bool(filter_training_images(records))
        serve_once(name, records)
    if train and not kept_any:
        raise no_usable_box(train)
    for name in test:
        records = load_records(name, "test")
        problem = _undecodable(records, exif_orientation) if check_test_files else None
        if problem:
            hint = (
                "; TEST.UNREADABLE_IMAGE_AS_EMPTY True counts it without predictions"
                if counts_unreadable_as_empty(name)
                else ""
            )
            raise BadRecordError(
                f"test dataset '{name}': cannot read image {problem} (every test image is "
                f"evaluated{hint})"
            )
        serve_once(name, records)
