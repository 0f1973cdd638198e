"""Gathering per-record evaluator results from all ranks."""

from __future__ import annotations

from detectron2.utils import comm

__all__ = ["gather_records"]


def gather_records(records: dict, distributed: bool) -> dict | None:
    """Merge the ``{record_id: result}`` dicts of all ranks on the main process.

    Returns:
        the merged dict on the main process (or the local dict when not distributed), None elsewhere.
    """
    if not distributed:
        return records
    comm.synchronize()
    gathered = comm.gather(records, dst=0)
    if not comm.is_main_process():
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged
