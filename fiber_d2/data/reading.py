"""Reading a dataset record's image for the mappers, and the errors that skip a training record or
stop an evaluation (:mod:`.mapper`, :mod:`.caption_mapper`, :mod:`.vl_mapper`)."""

from __future__ import annotations

import contextlib
import logging
from typing import IO, Union

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

from .datasets.common import IMAGE_READ_ERRORS, BadRecordError

__all__ = [
    "read_image_file",
    "read_record_image",
    "read_test_record_image",
    "record_name",
    "evaluation_error",
    "SkipRecord",
    "UnreadableImage",
]

logger = logging.getLogger(__name__)


def record_name(record: dict) -> str:
    """How a log line or an error names a detection-style record: its image id and file."""
    return f"record {record.get('image_id')} ({record.get('file_name')})"


class SkipRecord(Exception):
    """Raised inside a mapper when a record cannot be used."""


class UnreadableImage(SkipRecord):
    """The record's image file is missing, truncated or not an image."""


def read_image_file(
    file: Union[str, IO[bytes]], image_format: str = "RGB", exif_orientation: bool = False
) -> np.ndarray:
    """Decode an image file (a path or an open binary file) to an HWC uint8 array.

    By default the stored pixel grid, as the original reads every dataset (PIL ``open`` then
    ``convert("RGB")``) and as the public datasets' boxes and sizes (COCO, LVIS, Flickr30k,
    RefCOCO) are given; detectron2's ``read_image`` first turns the image by its EXIF orientation
    tag, which for a tagged file rotates the pixels away from their boxes (180 degrees) or swaps
    height and width (90 degrees).

    Args:
        file: a path (through detectron2's ``PathManager``) or a binary file object.
        image_format: "RGB", "BGR" or another format of detectron2's ``convert_PIL_to_numpy``.
        exif_orientation: turn the image upright by its EXIF tag first (``INPUT.EXIF_ORIENTATION``,
            for datasets annotated on upright photos).

    Raises:
        OSError / ValueError / SyntaxError: a missing, truncated or corrupt file.
    """
    with contextlib.ExitStack() as stack:
        if isinstance(file, str):
            file = stack.enter_context(PathManager.open(file, "rb"))
        image = stack.enter_context(Image.open(file))
        if exif_orientation:
            image = ImageOps.exif_transpose(image)
        return utils.convert_PIL_to_numpy(image, image_format)


def read_record_image(
    record: dict, image_format: str, exif_orientation: bool = False
) -> np.ndarray:
    """The HWC uint8 image of ``record["file_name"]``; raises :class:`UnreadableImage` when the file
    cannot be decoded and :class:`SkipRecord` when its size is not the record's height x width."""
    try:
        image = read_image_file(record["file_name"], image_format, exif_orientation)
    except IMAGE_READ_ERRORS as e:  # missing, truncated, corrupt or too large
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnreadableImage(f"cannot read image: {first}") from e
    h, w = image.shape[:2]
    expected = (record.get("height") or h, record.get("width") or w)
    if (h, w) != tuple(expected):
        raise SkipRecord(f"image is {h}x{w}, the record says {expected[0]}x{expected[1]}")
    return image


def read_test_record_image(
    record: dict, image_format: str, as_empty: bool, exif_orientation: bool = False
) -> np.ndarray:
    """The image of a test record; with ``as_empty`` an unreadable one becomes a black image of
    the record's size and the record is flagged ``"unreadable"`` (no predictions are scored)."""
    try:
        return read_record_image(record, image_format, exif_orientation)
    except UnreadableImage as e:
        if not as_empty:
            raise
        logger.warning("%s: %s; evaluated as an image without predictions", record_name(record), e)
        record["unreadable"] = True
        h, w = int(record.get("height") or 32), int(record.get("width") or 32)
        return np.zeros((h, w, 3), dtype=np.uint8)


def evaluation_error(record: dict, error: Exception, as_empty_hint: bool = True) -> BadRecordError:
    """The one-line error of a test record that cannot be evaluated (``as_empty_hint``: for an
    unreadable image, name ``TEST.UNREADABLE_IMAGE_AS_EMPTY``, which only the detection and
    grounding evaluators support)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = (
        " (TEST.UNREADABLE_IMAGE_AS_EMPTY True evaluates it as an image without predictions)"
        if as_empty_hint and isinstance(error, UnreadableImage)
        else ""
    )
    return BadRecordError(f"cannot evaluate {record_name(record)}: {text}{hint}")
