"""``VQADatasetMapper``: a question record -> image, question tokens and soft answer targets.

Output: ``image`` uint8 (3, S, S) in ``INPUT.FORMAT``; ``input_ids`` / ``attention_mask`` (T,);
``vqa_targets`` float (V,) (the soft score of every in-vocabulary answer, coarse spec §5.3) when the
record has answers; the record's own fields (``question_id``, ``answers``...) pass through.
Over-long questions are truncated to T tokens with a counted warning.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from detectron2.config import configurable

from fiber_d2.data.vl_mapper import FusedTaskMapper

__all__ = ["VQADatasetMapper", "soft_target"]


def soft_target(scores: dict[str, float], index: dict[str, int]) -> torch.Tensor:
    """(V,) float target: ``scores[a]`` at ``index[a]`` for every in-vocabulary answer ``a``."""
    target = torch.zeros(len(index))
    for answer, score in scores.items():
        if answer in index:
            target[index[answer]] = score
    return target


class VQADatasetMapper(FusedTaskMapper):
    """Map VQA question records to the model's inputs (see the module docstring)."""

    @configurable
    def __init__(self, *, answers: Sequence[str], **kwargs):
        """
        Args:
            answers: the answer vocabulary (V strings, index = class).
            kwargs: the arguments of :class:`fiber_d2.data.vl_mapper.FusedTaskMapper`.
        """
        super().__init__(**kwargs)
        self.index = {a: i for i, a in enumerate(answers)}

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, *, answers: Sequence[str]):
        return {**super().from_config(cfg, is_train), "answers": list(answers)}

    def __call__(self, dataset_dict: dict) -> dict:
        """Map one question record.

        Raises:
            BadRecordError naming the question and its image when the image cannot be read.
        """
        record = copy.copy(dataset_dict)
        name = f"question {record.get('question_id')}"
        record["image"] = self.image(record, name=name)
        record.update(self.encode(record["question"], name))
        if "answer_scores" in record:
            record["vqa_targets"] = soft_target(record["answer_scores"], self.index)
        return record
