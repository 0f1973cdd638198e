"""``VQAEvaluator``: official VQA accuracy and the ``vqa_submit.json`` file for EvalAI.

Per question the predicted answer (argmax over the vocabulary) is scored with
:func:`vqa.answers.vqa_accuracy` against the 10 human answers (official rules). Records that carry only
the original's processed soft scores (Arrow files) are scored with the soft score of the prediction,
which equals the official accuracy up to its leave-one-out averaging. Questions without answers
(test-dev / test-std) are only written to ``vqa_submit.json`` (``[{"question_id", "answer"}]``).
Each question of the dataset must be evaluated exactly once (``EvaluationCoverageError`` otherwise,
naming ``question_id`` values).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from fiber_d2.checkpoint.safe_io import write_whole
from fiber_d2.evaluation.integrity import SeenRecords

from .answers import vqa_accuracy

__all__ = ["VQAEvaluator"]

logger = logging.getLogger(__name__)


class VQAEvaluator(DatasetEvaluator):
    """Accuracy (percent) overall, per ``answer_type`` (``accuracy_<answer type>``) and per
    ``question_type`` (``accuracy_qtype/<question type>``), as the official evaluation reports them;
    writes ``<output_dir>/vqa_submit.json``."""

    def __init__(self, dataset_name: str, answers: Sequence[str], output_dir: str | None = None):
        """
        Args:
            dataset_name: for the log lines.
            answers: the answer vocabulary (index = class).
            output_dir: where ``vqa_submit.json`` is written (None: not written).
        """
        self.dataset_name = dataset_name
        self.answers = list(answers)
        self.output_dir = output_dir
        self._seen = SeenRecords(dataset_name, "VQAEvaluator", key="question_id")
        self.reset()

    def reset(self) -> None:
        self._rows: list[dict] = []
        self._seen.reset()

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for x, y in zip(inputs, outputs):
            self._seen.add(x["question_id"])
            row = {"question_id": x["question_id"], "answer": self.answers[y["answer_index"]]}
            if x.get("answers"):
                row["accuracy"] = vqa_accuracy(row["answer"], x["answers"])
            elif x.get("answer_scores") is not None:
                row["accuracy"] = float(x["answer_scores"].get(row["answer"], 0.0))
            for key in ("answer_type", "question_type"):
                if x.get(key):
                    row[key] = x[key]
            self._rows.append(row)

    def evaluate(self):
        self._seen.check()
        rows = [r for part in comm.gather(self._rows, dst=0) for r in part]
        if not comm.is_main_process():
            return {}
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, "vqa_submit.json")
            with write_whole(path, "w", encoding="utf-8") as f:
                json.dump(
                    [{"question_id": r["question_id"], "answer": r["answer"]} for r in rows], f
                )
            logger.info("%s: wrote %d answers to %s", self.dataset_name, len(rows), path)
        scored = [r for r in rows if "accuracy" in r]
        result = {"num_questions": float(len(rows))}
        if scored:
            result["accuracy"] = 100.0 * sum(r["accuracy"] for r in scored) / len(scored)
            for key, prefix in (("answer_type", "accuracy_"), ("question_type", "accuracy_qtype/")):
                by_type = defaultdict(list)
                for r in scored:
                    if key in r:
                        by_type[r[key]].append(r["accuracy"])
                for kind, accs in sorted(by_type.items()):
                    result[prefix + kind] = 100.0 * sum(accs) / len(accs)
        return {"vqa": result}
