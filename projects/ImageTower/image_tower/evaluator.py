"""``TokenAccuracyEvaluator``: per level, the accuracy on object tokens and on background tokens; with
a presence classifier, its accuracy per (image, category) label."""

from __future__ import annotations

from collections import OrderedDict

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from fiber_d2.evaluation.integrity import SeenRecords

__all__ = ["TokenAccuracyEvaluator"]


class TokenAccuracyEvaluator(DatasetEvaluator):
    """Counts right / all predictions over object tokens (label > 0: the category must be right)
    and background tokens, per level; results ``{"tokens": {"<level>_object_acc": %,
    "<level>_background_acc": %}}``, plus ``"presence_acc"`` (right / all of the (image, category)
    labels, logit > 0 = present) when the model outputs ``presence_logits``. Each image of the
    dataset must be evaluated exactly once (``EvaluationCoverageError`` otherwise)."""

    def __init__(self, dataset_name: str):
        self.dataset_name = dataset_name
        self._seen = SeenRecords(dataset_name, "TokenAccuracyEvaluator")
        self.reset()

    def reset(self):
        self._counts: dict[str, list[int]] = {}
        self._presence = [0, 0]  # right, all (image, category) labels
        self._seen.reset()

    def process(self, inputs, outputs):
        for record, out in zip(inputs, outputs):
            self._seen.add(record["image_id"])
            for level, logits in out["token_logits"].items():
                labels = record["token_labels"][level].to(logits.device)
                pred = logits.argmax(-1)
                obj = labels > 0
                c = self._counts.setdefault(level, [0, 0, 0, 0])
                c[0] += int((pred[obj] == labels[obj]).sum())
                c[1] += int(obj.sum())
                c[2] += int((pred[~obj] == 0).sum())
                c[3] += int((~obj).sum())
            if "presence_logits" in out:
                truth = record["presence"].to(out["presence_logits"].device) > 0
                self._presence[0] += int(((out["presence_logits"] > 0) == truth).sum())
                self._presence[1] += truth.numel()

    def evaluate(self):
        self._seen.check()
        gathered = comm.gather((self._counts, self._presence), dst=0)
        if not comm.is_main_process():
            return {}
        total: dict[str, torch.Tensor] = {}
        presence = [0, 0]
        for counts, (right, labels) in gathered:
            for level, c in counts.items():
                total[level] = total.get(level, torch.zeros(4, dtype=torch.long)) + torch.tensor(c)
            presence = [presence[0] + right, presence[1] + labels]
        res = OrderedDict()
        for level in sorted(total):
            c = total[level].tolist()
            res[f"{level}_object_acc"] = 100.0 * c[0] / max(c[1], 1)
            res[f"{level}_background_acc"] = 100.0 * c[2] / max(c[3], 1)
        if presence[1]:
            res["presence_acc"] = 100.0 * presence[0] / presence[1]
        return OrderedDict(tokens=res)
