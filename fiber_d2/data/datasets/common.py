"""Helpers shared by the dataset loaders: bad-record bookkeeping and record checks."""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence

__all__ = ["BadRecordError", "RecordFilter", "box_problem", "span_problem"]

logger = logging.getLogger(__name__)


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

    def skip(self, what: str, reason: str) -> None:
        """Record one skipped record, with a warning naming it.

        Args:
            what: the record (e.g. "image 12 (a.jpg)").
            reason: why it is skipped.
        """
        self.skipped += 1
        logger.warning("%s: skipping %s: %s", self.dataset_name, what, reason)

    def finish(self, records: List[dict]) -> List[dict]:
        """Log the skip count and return the kept records.

        Args:
            records: the valid records.

        Returns:
            ``records``; raises ValueError when it is empty.
        """
        if self.skipped:
            logger.warning(
                "%s: skipped %d of %d records (%s)",
                self.dataset_name,
                self.skipped,
                self.skipped + len(records),
                self.source,
            )
        if not records:
            raise ValueError(
                f"dataset {self.dataset_name!r}: no valid record in {self.source or 'its source'}"
                f" ({self.skipped} skipped)"
            )
        return records


def box_problem(xyxy: Sequence[float], width: float, height: float) -> Optional[str]:
    """Why an absolute xyxy box cannot belong to a ``width`` x ``height`` image, or None.

    A box is bad when a coordinate is not finite, when it does not overlap the image at all,
    or when it extends beyond the image by more than 10 % of the image side (small overhangs
    are common in real annotations and are clipped by the mapper). Degenerate (zero or
    negative size) boxes are not rejected here; the mapper drops them.

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
    tx, ty = 0.1 * width, 0.1 * height
    if max(x1, x2) <= 0 or max(y1, y2) <= 0 or min(x1, x2) >= width or min(y1, y2) >= height:
        return f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} image"
    if (
        min(x1, x2) < -tx
        or min(y1, y2) < -ty
        or max(x1, x2) > width + tx
        or max(y1, y2) > height + ty
    ):
        return f"box {[x1, y1, x2, y2]} extends far beyond the {width}x{height} image"
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


class BadRecordError(ValueError):
    """A one-line, user-facing error about a dataset or one of its records (naming it)."""
