"""ITMRerankRetrievalEvaluator: ITC recall of fiber_d2's evaluator, then ITM re-ranking of the top-k."""

import json
import math

import pytest
import torch
from retrieval.evaluator import ITMRerankRetrievalEvaluator
from torch import nn


class _TagModel(nn.Module):
    """Stub ITM: an image's tag is its pixel value, a caption's tag its first token id;
    the match logit is 1 for equal tags and 0 otherwise."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.register_buffer("pixel_std", torch.ones(3, 1, 1))
        self.pairs = 0

    def itm_logits(self, images, input_ids, attention_mask):
        self.pairs += images.shape[0]
        match = (images[:, 0, 0, 0] == input_ids[:, 0].float()).float()
        return torch.stack([1 - match, match], dim=1)


def _unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Three images (tags 1, 2, 3) at 0, 90 and 180 degrees; captions t0..t4 at 80, 10 (image 10),
# 105 (image 20), 130, 200 (image 30). Cosines by hand:
#   image 10: t0 .174, t1 .985, t2 -.259, t3 -.643, t4 -.940 -> t1 first (hit)
#   image 20: t0 .985, t1 .174, t2 .966, t3 .766, t4 -.342 -> t0 first (miss), own t2 second
#   image 30: t0 -.174, t1 -.985, t2 .259, t3 .643, t4 .940 -> t4 first (hit)
# Columns: t0 -> 20 first (miss), own 10 second; t1 -> 10 (hit); t2 -> 20 (hit);
#   t3 -> 20 (.766) first (miss), own 30 (.643) second; t4 -> 30 (hit).
IMAGE_EMB = {10: _unit(0), 20: _unit(90), 30: _unit(180)}
TEXT_EMB = {10: [_unit(80), _unit(10)], 20: [_unit(105)], 30: [_unit(130), _unit(200)]}


def _tagged_input(image_id: int, tag: int, k: int) -> dict:
    """An image filled with ``tag`` and its ``k`` captions, each starting with the token ``tag``."""
    return {
        "image_id": image_id,
        "image": torch.full((3, 2, 2), tag, dtype=torch.uint8),
        "input_ids": torch.tensor([[tag, 7, 7]] * k),
        "attention_mask": torch.ones(k, 3, dtype=torch.long),
    }


def _records():
    inputs, outputs = [], []
    for tag, image_id in enumerate((10, 20, 30), start=1):
        inputs.append(_tagged_input(image_id, tag, len(TEXT_EMB[image_id])))
        outputs.append(
            {
                "image_embedding": torch.tensor(IMAGE_EMB[image_id]),
                "text_embeddings": torch.tensor(TEXT_EMB[image_id]),
            }
        )
    return inputs, outputs


def _evaluate(k, tmp_path=None):
    model = _TagModel()
    ev = ITMRerankRetrievalEvaluator(
        "toy", model=model, rerank_k=k, topk=(1, 2), distributed=False, output_dir=tmp_path
    )
    ev.reset()
    inputs, outputs = _records()
    ev.process(inputs[:2], outputs[:2])  # two batches, like a data loader
    ev.process(inputs[2:], outputs[2:])
    return ev.evaluate()["retrieval"], model


def test_itm_reranking_fixes_the_itc_top_k(tmp_path):
    # Every miss above has its own pair second, inside the top-2 that ITM re-scores.
    metrics, model = _evaluate(k=2, tmp_path=tmp_path)
    assert metrics["TR@1"] == pytest.approx(100.0)
    assert metrics["IR@1"] == pytest.approx(100.0)
    assert model.pairs <= 3 * 2 + 5 * 2  # only top-k candidates were scored
    saved = json.loads((tmp_path / "retrieval_results.json").read_text())
    assert saved["retrieval"]["TR@1"] == pytest.approx(100.0)


def test_k_one_keeps_the_itc_ranking():
    metrics, _ = _evaluate(k=1)
    # ITC alone (table above): TR@1 2/3, IR@1 3/5; R@2 is 100 in both directions.
    assert metrics["TR@1"] == pytest.approx(200.0 / 3)
    assert metrics["IR@1"] == pytest.approx(60.0)
    assert metrics["TR@2"] == pytest.approx(100.0) and metrics["IR@2"] == pytest.approx(100.0)


def test_itm_scores_each_row_image_with_each_column_caption():
    """Images processed out of image_id order with 3, 1 and 2 captions; ITC ties everywhere and
    k covers every pair, so ITM alone ranks: each pair must be scored with the image of its row
    (sorted image_id) and the caption of its column, which gives TR@1 = IR@1 = 100."""
    captions = {10: 3, 20: 1, 30: 2}
    inputs, outputs = [], []
    for image_id in (30, 10, 20):
        k = captions[image_id]
        inputs.append(_tagged_input(image_id, image_id // 10, k))
        outputs.append(
            {"image_embedding": torch.tensor([1.0, 0.0]), "text_embeddings": torch.ones(k, 2)}
        )
    ev = ITMRerankRetrievalEvaluator(
        "toy", model=_TagModel(), rerank_k=10, topk=(1,), distributed=False
    )
    ev.reset()
    ev.process(inputs[:1], outputs[:1])
    ev.process(inputs[1:], outputs[1:])
    metrics = ev.evaluate()["retrieval"]
    assert metrics["TR@1"] == pytest.approx(100.0) and metrics["IR@1"] == pytest.approx(100.0)


def test_rerank_k_below_the_largest_recall_k_is_warned(caplog):
    with caplog.at_level("WARNING"):
        ITMRerankRetrievalEvaluator("toy", model=_TagModel(), rerank_k=2, topk=(1, 2))
    assert "RERANK_K" not in caplog.text
    with caplog.at_level("WARNING"):
        ITMRerankRetrievalEvaluator("toy", model=_TagModel(), rerank_k=1, topk=(1, 2))
    assert "RETRIEVAL.RERANK_K=1 is below the largest recall K=2" in caplog.text


def test_missing_inputs_are_named():
    ev = ITMRerankRetrievalEvaluator("toy", model=_TagModel(), distributed=False)
    inputs, outputs = _records()
    del inputs[0]["image"]
    with pytest.raises(KeyError, match="image 10.*'image'"):
        ev.process(inputs, outputs)
