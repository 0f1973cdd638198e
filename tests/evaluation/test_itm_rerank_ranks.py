"""ITM re-ranking in two gloo processes: each rank scores the pairs of the images it mapped."""

import json
import sys
from pathlib import Path

import pytest
from two_ranks import run_two_ranks

_RETRIEVAL = Path(__file__).resolve().parents[2] / "projects" / "Retrieval"
for _path in (_RETRIEVAL, _RETRIEVAL / "tests"):  # also in the spawned ranks, which import this
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from retrieval.evaluator import ITMRerankRetrievalEvaluator  # noqa: E402
from test_itm_rerank_evaluator import _records, _TagModel  # noqa: E402


class _RecordingModel(_TagModel):
    """The tag model, remembering the image tags it scored; optionally failing."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.tags = set()
        self.fail = fail

    def itm_logits(self, images, input_ids, attention_mask):
        if self.fail:
            raise RuntimeError("scorer broke")
        self.tags.update(int(t) for t in images[:, 0, 0, 0])
        return super().itm_logits(images, input_ids, attention_mask)


def _evaluate_on(rank: int, k: int, failing_rank: int | None = None):
    model = _RecordingModel(fail=rank == failing_rank)
    ev = ITMRerankRetrievalEvaluator("toy", model=model, rerank_k=k, topk=(1, 2), distributed=True)
    ev.reset()
    inputs, outputs = _records()  # images 10, 20, 30 with tags 1, 2, 3
    mine = [0, 2] if rank == 0 else [1]
    ev.process([inputs[i] for i in mine], [outputs[i] for i in mine])
    try:
        result = ev.evaluate()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "tags": sorted(model.tags)}
    return {"result": result, "tags": sorted(model.tags), "pairs": model.pairs}


def _single(k: int) -> dict:
    ev = ITMRerankRetrievalEvaluator(
        "toy", model=_TagModel(), rerank_k=k, topk=(1, 2), distributed=False
    )
    ev.process(*_records())
    return json.loads(json.dumps(ev.evaluate()))


@pytest.mark.long(0.5)
def test_each_rank_scores_its_own_images(tmp_path):
    zero, one = run_two_ranks(_evaluate_on, tmp_path, 2)
    assert zero["result"] == _single(2)
    assert zero["result"]["retrieval"]["TR@1"] == 100.0  # re-ranking fixed the ITC misses
    assert one["result"] == {}
    assert zero["tags"] == [1, 3] and one["tags"] == [2]
    assert zero["pairs"] > 0 and one["pairs"] > 0


@pytest.mark.long(0.5)
def test_a_failing_rank_fails_both_without_a_hang(tmp_path):
    zero, one = run_two_ranks(_evaluate_on, tmp_path, 2, 1, timeout=120)
    assert "rank 1: RuntimeError: scorer broke" in zero["error"]
    assert "failed on rank 1" in one["error"]


@pytest.mark.long(0.5)
def test_main_failing_before_the_pairs_releases_the_other_rank(tmp_path):
    # k = 0 fails in topk_rerank on the main process, before any pair is sent.
    zero, one = run_two_ranks(_evaluate_on, tmp_path, 0, timeout=120)
    assert "k must be >= 1" in zero["error"]
    assert one["result"] == {} and one["tags"] == []
