"""The projects' evaluators (VQA, NLVR2, captioning, image tower) score every record of their
dataset exactly once, like fiber_d2's own: a record evaluated twice or never is an
``EvaluationCoverageError`` naming the task's record id, not a silently de-duplicated metric."""

import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog

from fiber_d2.evaluation import EvaluationCoverageError

ROOT = Path(__file__).resolve().parents[2]
for _project in ("VQA", "NLVR2", "Captioning", "ImageTower"):
    if str(ROOT / "projects" / _project) not in sys.path:
        sys.path.insert(0, str(ROOT / "projects" / _project))

from captioning import CaptionEvaluator  # noqa: E402
from image_tower import TokenAccuracyEvaluator  # noqa: E402
from nlvr2 import NLVR2Evaluator  # noqa: E402
from vqa import VQAEvaluator  # noqa: E402

# task -> (evaluator for a dataset name, record id key, id of record i, (input, output) of record i)
CASES = {
    "vqa": (
        lambda name: VQAEvaluator(name, ["yes", "no"]),
        "question_id",
        lambda i: 100 + i,
        lambda i: ({"question_id": 100 + i, "answers": ["yes"] * 10}, {"answer_index": 0}),
    ),
    "nlvr2": (
        NLVR2Evaluator,
        "identifier",
        lambda i: f"dev-{i}",
        lambda i: ({"identifier": f"dev-{i}", "label": 1}, {"prediction": 1}),
    ),
    "captioning": (
        lambda name: CaptionEvaluator(name, None, ["BLEU"], distributed=False),
        "image_id",
        lambda i: i,
        lambda i: ({"image_id": i, "captions": ["a red circle"]}, {"caption": "a red circle"}),
    ),
    "image_tower": (
        TokenAccuracyEvaluator,
        "image_id",
        lambda i: i,
        lambda i: (
            {"image_id": i, "token_labels": {"res5": torch.tensor([[0, 1]])}},
            {"token_logits": {"res5": torch.zeros(1, 2, 2)}},
        ),
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    make, key, record_id, example = CASES[request.param]
    name = f"fiber_test_exactly_once_{request.param}"
    DatasetCatalog.register(name, lambda: [{key: record_id(i)} for i in (1, 2, 3)])
    yield make, name, key, record_id, example
    DatasetCatalog.remove(name)


def _run(evaluator, example, indices):
    evaluator.reset()
    pairs = [example(i) for i in indices]
    evaluator.process([p[0] for p in pairs], [p[1] for p in pairs])
    return evaluator.evaluate()


def test_each_record_once_evaluates(case):
    make, name, _, _, example = case
    assert _run(make(name), example, [1, 2, 3])


def test_a_repeated_and_a_missing_record_are_named(case):
    make, name, key, record_id, example = case
    with pytest.raises(EvaluationCoverageError) as err:
        _run(make(name), example, [1, 2, 2])
    message = str(err.value)
    assert name in message and "\n" not in message
    assert f"1 evaluated more than once ({key} {record_id(2)})" in message
    assert f"1 never evaluated ({key} {record_id(3)})" in message
    with pytest.raises(EvaluationCoverageError, match="not in the dataset"):
        _run(make(name), example, [1, 2, 3, 4])
