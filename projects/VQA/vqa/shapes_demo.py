"""The VQA runner of ``tools/demo_vl.py``: fine-tune on the shapes questions, measure the official
accuracy on the held-out questions against the majority-answer baseline, draw a few answered questions.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog

from fiber_d2.data.vl_transforms import read_vl_image
from fiber_d2.engine.shapes_demo import caption_picture, task_result, train_and_evaluate

from .answers import vqa_accuracy
from .mapper import VQADatasetMapper
from .trainer import VQATrainer, load_vqa_config
from .vocab import answer_vocab

__all__ = [
    "run",
    "majority_baseline",
    "question_type_baseline",
    "question_type_prior",
    "SHAPES_CONFIG",
]

logger = logging.getLogger(__name__)

SHAPES_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml")


def majority_baseline(train: list[dict], test: list[dict]) -> tuple[str, float]:
    """(the most frequent training answer, its official accuracy (percent) on ``test``)."""
    answer = Counter(r["multiple_choice_answer"] for r in train).most_common(1)[0][0]
    accuracy = 100.0 * np.mean([vqa_accuracy(answer, r["answers"]) for r in test])
    return answer, float(accuracy)


def question_type_prior(train: list[dict], test: list[dict]) -> dict[str, float]:
    """Per question type of ``test``, the accuracy (percent) of the most frequent training answer of
    that type (the overall most frequent answer for a type unseen in training)."""
    by_type: dict[str, Counter] = {}
    for r in train:
        by_type.setdefault(r["question_type"], Counter())[r["multiple_choice_answer"]] += 1
    fallback = majority_baseline(train, test[:1])[0]
    accs: dict[str, list[float]] = {}
    for r in test:
        counts = by_type.get(r.get("question_type"))
        answer = counts.most_common(1)[0][0] if counts else fallback
        accs.setdefault(r.get("question_type", ""), []).append(vqa_accuracy(answer, r["answers"]))
    return {qtype: 100.0 * float(np.mean(a)) for qtype, a in sorted(accs.items())}


def question_type_baseline(train: list[dict], test: list[dict]) -> float:
    """Accuracy (percent) on ``test`` of the most frequent training answer of each question type: a
    text-only prior, stronger than :func:`majority_baseline`."""
    prior = question_type_prior(train, test)
    counts = Counter(r.get("question_type", "") for r in test)
    return sum(prior[t] * n for t, n in counts.items()) / sum(counts.values())


def run(coarse_weights: str | None, output_dir: Path, opts: tuple = (), pictures: int = 4) -> dict:
    """Fine-tune ``FIBERVQA`` on ``shapes_train_vqa`` from ``coarse_weights`` (None: from scratch)."""
    output_dir = Path(output_dir)
    cfg = load_vqa_config(
        SHAPES_CONFIG,
        [*opts, "MODEL.WEIGHTS", coarse_weights or "", "OUTPUT_DIR", str(output_dir)],
    )
    cfg.freeze()
    results, model, seconds = train_and_evaluate(VQATrainer, cfg)
    metrics = results["vqa"]
    test_name = cfg.DATASETS.TEST[0]
    test = DatasetCatalog.get(test_name)
    train = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    top, baseline = majority_baseline(train, test)
    vocab = answer_vocab(cfg)
    mapper = VQADatasetMapper(cfg, False, answers=vocab)
    drawn = []
    with torch.no_grad():
        for record in test[:pictures]:
            pred = vocab[model([mapper(record)])[0]["answer_index"]]
            lines = [f"Q: {record['question']}", f"A: {pred}   (truth: {record['answers'][0]})"]
            path = output_dir / "pictures" / f"vqa_{record['question_id']}.png"
            drawn.append(caption_picture([read_vl_image(record)], lines, path))
    # the accuracy of each question type beside its text-only prior: which kinds of question the
    # image answers (summary.md's breakdown)
    prior = question_type_prior(train, test)
    breakdown = {
        qtype: {"value": metrics[f"accuracy_qtype/{qtype}"], "baseline": value}
        for qtype, value in prior.items()
    }
    return task_result(
        "VQA",
        "accuracy",
        metrics["accuracy"],
        baseline,
        seconds,
        drawn,
        baseline_name=f"majority answer '{top}'",
        other_baselines={"answer prior per question type": question_type_baseline(train, test)},
        metrics=metrics,
        breakdown={"by": "question type", "baseline_name": "answer prior", "rows": breakdown},
    )
