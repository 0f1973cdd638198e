"""What keeps an evaluation honest: every record scored exactly once, and strict-JSON results.

Every fiber_d2 evaluator records the id of each input it processes (:class:`SeenRecords`: the
``image_id``, or the task's own id where an image has several records) and, before computing a
metric, compares them with the records of its dataset on every rank: a record never evaluated,
evaluated twice (on one rank or on two), or not in the dataset raises
:class:`EvaluationCoverageError` with one line naming the dataset and a few of the ids. All ranks
take part in the same ``all_gather`` and reach the same verdict, so none is left waiting.

Inputs flagged ``"unreadable"`` by the test mapper (``TEST.UNREADABLE_IMAGE_AS_EMPTY``) count as
evaluated, with no predictions (:func:`without_predictions`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections import Counter
from typing import Any

from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..checkpoint.safe_io import write_whole

__all__ = [
    "EvaluationCoverageError",
    "SeenRecords",
    "dataset_record_ids",
    "check_exactly_once",
    "json_safe",
    "without_predictions",
    "write_metrics",
]

logger = logging.getLogger(__name__)


class EvaluationCoverageError(RuntimeError):
    """Some record of the evaluated dataset was not evaluated exactly once."""


def dataset_record_ids(dataset_name: str, key: str = "image_id") -> list:
    """The ``key`` (a record's id: ``image_id``, a VQA ``question_id``, ...) of every record of a
    registered dataset, in order.

    Raises:
        KeyError: unregistered dataset, or a record without ``key``.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset '{dataset_name}' is not registered in DatasetCatalog")
    ids = []
    for record in DatasetCatalog.get(dataset_name):
        if key not in record:
            raise KeyError(f"dataset '{dataset_name}': a record has no '{key}'")
        ids.append(record[key])
    return ids


def _examples(ids, limit: int = 5) -> str:
    ids = list(ids)
    try:
        ids = sorted(ids)
    except TypeError:
        ids = sorted(ids, key=str)
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def check_exactly_once(
    dataset_name: str, seen: list, expected: list, evaluator: str, key: str = "image_id"
) -> None:
    """Raise unless ``seen`` holds each id of ``expected`` exactly once and nothing else.

    Args:
        dataset_name: for the message.
        seen: the ids processed (all ranks together).
        expected: the dataset's record ids.
        evaluator: the evaluator's name, for the message.
        key: the name of the ids, for the message.

    Raises:
        EvaluationCoverageError: one line with the counts and a few ids of each kind.
    """
    repeated = [i for i, n in Counter(expected).items() if n > 1]
    if repeated:  # each of its records counts as one evaluation of the id: say so, not "twice"
        raise EvaluationCoverageError(
            f"{evaluator} on '{dataset_name}' ({len(expected)} records): the dataset gives "
            f"{len(repeated)} {key}(s) to more than one record ({key} {_examples(repeated)}); each "
            "record needs its own"
        )
    counts = Counter(seen)
    wanted = set(expected)
    problems = []
    missing = wanted - set(counts)
    if missing:
        problems.append(f"{len(missing)} never evaluated ({key} {_examples(missing)})")
    twice = [i for i, n in counts.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} evaluated more than once ({key} {_examples(twice)})")
    unknown = set(counts) - wanted
    if unknown:
        problems.append(f"{len(unknown)} not in the dataset ({key} {_examples(unknown)})")
    if problems:
        raise EvaluationCoverageError(
            f"{evaluator} on '{dataset_name}' ({len(wanted)} records): " + "; ".join(problems)
        )


class SeenRecords:
    """The record ids one evaluator processed on this rank, checked against its dataset.

    Args:
        dataset_name: the evaluated dataset.
        evaluator: name used in messages.
        distributed: combine the ids of all ranks before checking.
        key: the record field that identifies a record (``image_id``; a task with several records
            per image names its own, e.g. VQA's ``question_id``).
    """

    def __init__(
        self, dataset_name: str, evaluator: str, distributed: bool = True, key: str = "image_id"
    ) -> None:
        self.dataset_name = dataset_name
        self.evaluator = evaluator
        self.distributed = distributed
        self.key = key
        self.ids: list = []

    def reset(self) -> None:
        self.ids = []

    def add(self, record_id: Any) -> None:
        self.ids.append(record_id)

    def check(self, expected: list | None = None) -> None:
        """Gather the ids of all ranks (every rank) and raise on a gap or a duplicate.

        Args:
            expected: the dataset's ids (default: read from DatasetCatalog; for a name that is
                not registered, which only direct use of an evaluator allows, only duplicates
                can be checked, and a warning says so).

        Raises:
            EvaluationCoverageError: on every rank, with the same message.
        """
        seen = list(self.ids)
        if self.distributed and comm.get_world_size() > 1:
            seen = [i for part in comm.all_gather(seen) for i in part]
        if expected is None:
            if self.dataset_name in DatasetCatalog.list():
                expected = dataset_record_ids(self.dataset_name, self.key)
            else:
                logger.warning(
                    "%s: dataset '%s' is not registered; only duplicates are checked",
                    self.evaluator,
                    self.dataset_name,
                )
                expected = list(set(seen))
        check_exactly_once(self.dataset_name, seen, expected, self.evaluator, self.key)


def without_predictions(inp: dict, out: dict) -> dict:
    """``out`` with its ``instances`` emptied when the input image was unreadable."""
    if inp.get("unreadable") and "instances" in out:
        return {**out, "instances": out["instances"][:0]}
    return out


def json_safe(value: Any) -> Any:
    """A copy of ``value`` for strict JSON: NaN / inf floats become None (``null``), dict keys
    strings, tuples lists, and 0-d numpy / torch scalars Python numbers; any other value (e.g. a
    numpy array or a tensor with dimensions) is returned as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(value.item())
    return value


def write_metrics(output: dict, output_dir: str | None, file_name: str) -> dict:
    """Write an evaluator's ``output`` as strict JSON to ``output_dir/file_name`` (when a folder is
    given) and return a deep copy of it, what ``DatasetEvaluator.evaluate`` hands to the trainer."""
    if output_dir:
        PathManager.mkdirs(output_dir)
        with write_whole(os.path.join(output_dir, file_name), "w") as f:
            json.dump(json_safe(output), f, allow_nan=False)
    return copy.deepcopy(output)
