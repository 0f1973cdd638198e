"""``NLVR2Evaluator``: accuracy (percent) of the True/False judgements on one split (dev, test-P)."""

from __future__ import annotations

import json
import logging
import os

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from fiber_d2.checkpoint.safe_io import write_whole
from fiber_d2.evaluation.integrity import SeenRecords

__all__ = ["NLVR2Evaluator"]

logger = logging.getLogger(__name__)


class NLVR2Evaluator(DatasetEvaluator):
    """Returns ``{"nlvr2": {"accuracy", "num_examples"}}``; writes ``predictions.json``
    (``[{"identifier", "prediction": "True"/"False"}]``) to ``output_dir`` when given. Each
    example of the dataset must be evaluated exactly once (``EvaluationCoverageError`` otherwise,
    naming ``identifier`` values)."""

    def __init__(self, dataset_name: str, output_dir: str | None = None):
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self._seen = SeenRecords(dataset_name, "NLVR2Evaluator", key="identifier")
        self.reset()

    def reset(self) -> None:
        self._rows: list[dict] = []
        self._seen.reset()

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for x, y in zip(inputs, outputs):
            self._seen.add(x["identifier"])
            self._rows.append(
                {"identifier": x["identifier"], "prediction": y["prediction"], "label": x["label"]}
            )

    def evaluate(self):
        self._seen.check()
        rows = [r for part in comm.gather(self._rows, dst=0) for r in part]
        if not comm.is_main_process():
            return {}
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with write_whole(os.path.join(self.output_dir, "predictions.json"), "w") as f:
                names = ("False", "True")
                json.dump([{"identifier": r["identifier"], "prediction": names[r["prediction"]]}
                           for r in rows], f)  # fmt: skip
        if not rows:
            return {"nlvr2": {"num_examples": 0.0}}
        correct = sum(int(r["prediction"]) == int(r["label"]) for r in rows)
        accuracy = 100.0 * correct / len(rows)
        logger.info(
            "%s: NLVR2 accuracy %.2f on %d examples", self.dataset_name, accuracy, len(rows)
        )
        return {"nlvr2": {"accuracy": accuracy, "num_examples": float(len(rows))}}
