"""The answer vocabulary of a VQA config and the filtering of unanswerable training questions.

``VQA.ANSWER_VOCAB`` names a json list of answers (index = class); when empty the vocabulary is built
from the records of ``VQA.VOCAB_DATASETS`` (default: ``DATASETS.TRAIN``) as the original does: the
normalised ``multiple_choice_answer`` strings seen at least ``VQA.MIN_ANSWER_COUNT`` times, in the
order of their first occurrence (coarse spec §5.3; 3129 answers on VQAv2 train2014 + val2014 at 9,
in the order of the released checkpoints' classifier rows). The original's Arrow files carry each
answer's class index, so their vocabulary is read back from them.
"""

from __future__ import annotations

import functools
import json
import logging
import os

from fiber_d2.data.datasets.common import BadRecordError, load_records
from fiber_d2.engine.setup import ConfigError

from .answers import build_answer_vocab, vocab_from_labels

__all__ = ["answer_vocab", "drop_unanswerable", "read_vocab_file"]

logger = logging.getLogger(__name__)


def read_vocab_file(vocab_file: str) -> tuple[str, ...]:
    """The answers of a ``VQA.ANSWER_VOCAB`` file (a json list of strings, index = class).

    Raises:
        ConfigError: a missing file, or one that is not a json list of strings (one line).
    """
    if not os.path.isfile(vocab_file):
        raise ConfigError(f"VQA.ANSWER_VOCAB file not found: {vocab_file}")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            answers = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"VQA.ANSWER_VOCAB {vocab_file}: {' '.join(str(e).split())}") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"VQA.ANSWER_VOCAB {vocab_file} must hold a json list of strings")
    return tuple(answers)


@functools.lru_cache(maxsize=4)
def _vocab(vocab_file: str, datasets: tuple[str, ...], min_count: int) -> tuple[str, ...]:
    if vocab_file:
        return read_vocab_file(vocab_file)
    try:
        records = [r for name in datasets for r in load_records(name, "answer-vocabulary")]
    except BadRecordError as e:
        raise ConfigError(
            f"{e}; the answer vocabulary is counted in VQA.VOCAB_DATASETS (default "
            "DATASETS.TRAIN): to evaluate without those files, give the checkpoint's answer list "
            "as VQA.ANSWER_VOCAB"
        ) from None
    answered = [r for r in records if "multiple_choice_answer" in r]
    if answered and all("answer_labels" in r for r in answered):
        # the original's Arrow files: their rows name each label's answer (MIN_ANSWER_COUNT unused)
        try:
            answers = vocab_from_labels(answered)
        except ValueError as e:
            raise ConfigError(f"VQA answer vocabulary of {list(datasets)}: {e}") from None
        logger.info(
            "VQA answer vocabulary: %d answers from the labels of %s", len(answers), datasets
        )
        return tuple(answers)
    answers = build_answer_vocab(answered, min_count)
    if not answers:
        raise ConfigError(
            f"no answer occurs {min_count}+ times in {list(datasets)}; lower VQA.MIN_ANSWER_COUNT"
        )
    logger.info("VQA answer vocabulary: %d answers from %s", len(answers), list(datasets))
    return tuple(answers)


def answer_vocab(cfg) -> list[str]:
    """The config's answer vocabulary (cached per vocabulary file / datasets / minimum count)."""
    datasets = tuple(cfg.VQA.VOCAB_DATASETS) or tuple(cfg.DATASETS.TRAIN)
    return list(_vocab(cfg.VQA.ANSWER_VOCAB, datasets, cfg.VQA.MIN_ANSWER_COUNT))


def drop_unanswerable(records: list[dict], answers: list[str]) -> list[dict]:
    """Training records with at least one in-vocabulary answer; the others are counted and dropped
    (as the original drops them from train and val)."""
    vocab = set(answers)
    kept = [r for r in records if any(a in vocab for a in r.get("answer_scores", {}))]
    dropped = len(records) - len(kept)
    if dropped:
        logger.warning(
            "dropped %d of %d training questions without an in-vocabulary answer",
            dropped,
            len(records),
        )
    return kept
