"""Image-text retrieval recall: hand-computed ranks, ties, the evaluator, a 2-process gather."""

import json
import math

import pytest
import torch
from two_ranks import run_two_ranks

from fiber_d2.evaluation.retrieval import RetrievalEvaluator, retrieval_recall

# 3 images, 5 captions: captions 0, 1 -> image 0; caption 2 -> image 1; captions 3, 4 -> image 2.
SIM = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3],
        [0.5, 0.4, 0.3, 0.9, 0.1],
        [0.1, 0.2, 0.3, 0.0, 0.05],
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def _reference_recall(sim, text_to_image, ks):
    """Brute force: rank by (-score, index), i.e. a stable descending sort."""
    n_img, n_txt = sim.shape
    s = sim.tolist()
    t2i = text_to_image.tolist()
    tr, ir = {}, {}
    for k in ks:
        hits = 0
        for i in range(n_img):
            order = sorted(range(n_txt), key=lambda j, i=i: (-s[i][j], j))[:k]
            hits += any(t2i[j] == i for j in order)
        tr[k] = 100.0 * hits / n_img
        hits = 0
        for j in range(n_txt):
            order = sorted(range(n_img), key=lambda i, j=j: (-s[i][j], i))[:k]
            hits += t2i[j] in order
        ir[k] = 100.0 * hits / n_txt
    return tr, ir


def test_hand_computed_ranks():
    # TR best-caption ranks: image 0 -> 0; image 1 -> 3 (0.5, 0.4, 0.9 beat 0.3);
    # image 2 -> 3 (caption 4: 0.05 is beaten by 0.1, 0.2, 0.3).
    # IR ranks: caption 0 -> 0; 1 -> 2; 2 -> 1 (0.8 above; the 0.3 tie with image 2 comes after
    # image 1); 3 -> 2; 4 -> 2.
    out = retrieval_recall(SIM, TEXT_TO_IMAGE, topk=(1, 2, 4))
    assert out["TR@1"] == pytest.approx(100 / 3)
    assert out["TR@2"] == pytest.approx(100 / 3)
    assert out["TR@4"] == pytest.approx(100.0)
    assert out["IR@1"] == pytest.approx(20.0)
    assert out["IR@2"] == pytest.approx(40.0)
    assert out["IR@4"] == pytest.approx(100.0)
    assert out["RSUM"] == pytest.approx(100 / 3 * 2 + 100 + 20 + 40 + 100)
    assert out["TR_mean"] == pytest.approx((100 / 3 * 2 + 100) / 3)
    assert out["mean"] == pytest.approx((out["TR_mean"] + out["IR_mean"]) / 2)


def test_means_average_over_the_given_ks():
    """TR_mean / IR_mean average the recalls of the K values given (here two), "mean" is their
    mean; hand values from the ranks of test_hand_computed_ranks."""
    out = retrieval_recall(SIM, TEXT_TO_IMAGE, topk=(1, 4))
    tr_mean, ir_mean = (100 / 3 + 100) / 2, (20 + 100) / 2
    assert out["TR_mean"] == pytest.approx(tr_mean)
    assert out["IR_mean"] == pytest.approx(ir_mean)
    assert out["mean"] == pytest.approx((tr_mean + ir_mean) / 2)
    assert out["RSUM"] == pytest.approx(100 / 3 + 100 + 20 + 100)


def test_ties_go_to_the_lower_index():
    # Image 1's caption (column 1) ties with column 0 in row 1: column 0 ranks first.
    sim = torch.tensor([[1.0, 1.0], [0.5, 0.5]])
    out = retrieval_recall(sim, torch.tensor([0, 1]), topk=(1, 2))
    assert out["TR@1"] == 50.0 and out["TR@2"] == 100.0
    # Column 1 (image 1's caption): images 0 and 1 are 1.0 / 0.5 -> rank 1.
    assert out["IR@1"] == 50.0
    # All equal: each image/caption with the lowest index wins.
    out = retrieval_recall(torch.zeros(2, 2), torch.tensor([0, 1]), topk=(1,))
    assert out["TR@1"] == 50.0 and out["IR@1"] == 50.0


def test_against_brute_force_random():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 4, (7, 16), generator=g).float()  # many ties
    t2i = torch.cat([torch.arange(7), torch.randint(0, 7, (9,), generator=g)])
    out = retrieval_recall(sim, t2i, topk=(1, 3, 5))
    tr, ir = _reference_recall(sim, t2i, (1, 3, 5))
    for k in (1, 3, 5):
        assert out[f"TR@{k}"] == pytest.approx(tr[k])
        assert out[f"IR@{k}"] == pytest.approx(ir[k])


def test_separate_t2i_matrix_is_used_for_ir():
    out = retrieval_recall(SIM, TEXT_TO_IMAGE, topk=(1,), sim_t2i=-SIM)
    # IR with negated scores: each caption's image must be the lowest in SIM's column.
    # Columns: 0 -> min at image 2; 1 -> image 0 (hit); 2 -> images 1 and 2 tie at 0.3, image 1
    # first (hit); 3 -> image 2 (hit); 4 -> image 2 (hit).
    assert out["IR@1"] == pytest.approx(80.0)
    assert out["TR@1"] == pytest.approx(100 / 3)  # TR unchanged


def test_bad_inputs():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall(SIM, torch.tensor([0, 0, 0, 2, 2]))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        retrieval_recall(SIM, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="N_img, N_txt"):
        retrieval_recall(SIM[0], TEXT_TO_IMAGE)
    # a NaN row compared false with every score: its captions ranked first, counted as hits
    nan = SIM.clone()
    nan[0] = float("nan")
    with pytest.raises(ValueError, match=r"sim holds 5 NaN score\(s\) of 15"):
        retrieval_recall(nan, TEXT_TO_IMAGE)
    with pytest.raises(ValueError, match="sim_t2i holds 5 NaN"):
        retrieval_recall(SIM, TEXT_TO_IMAGE, sim_t2i=nan)
    # infinities rank like any number
    inf = SIM.clone()
    inf[0, 2], inf[1, 2] = float("inf"), float("-inf")
    tr, ir = _reference_recall(inf, TEXT_TO_IMAGE, (1, 5))
    recall = retrieval_recall(inf, TEXT_TO_IMAGE, (1, 5))
    assert recall["TR@1"] == tr[1] != retrieval_recall(SIM, TEXT_TO_IMAGE, (1,))["TR@1"]
    assert [recall["IR@1"], recall["TR@5"], recall["IR@5"]] == pytest.approx([ir[1], tr[5], ir[5]])


def _outputs(ids, dim=4, swap=()):
    """One-hot embeddings: image i -> e_i, its two captions -> e_i (or e_j for swapped ids)."""
    inputs, outputs = [], []
    for i in ids:
        img = torch.nn.functional.one_hot(torch.tensor(i), dim).float()
        txt_id = (i + 1) % len(ids) if i in swap else i
        txt = torch.nn.functional.one_hot(torch.tensor([i, txt_id]), dim).float()
        inputs.append({"image_id": i, "captions": ["a", "b"]})
        outputs.append({"image_embedding": img, "text_embeddings": txt})
    return inputs, outputs


def test_evaluator_perfect_half_and_empty():
    ev = RetrievalEvaluator("toy", distributed=False)
    ev.reset()
    ev.process(*_outputs([0, 1, 2, 3]))
    res = ev.evaluate()["retrieval"]
    assert all(res[f"{d}@{k}"] == 100.0 for d in ("TR", "IR") for k in (1, 5, 10))
    assert res["RSUM"] == 600.0

    # Images 0 and 1 have their second caption equal to the next image's embedding.
    ev.reset()
    inputs, outputs = _outputs([0, 1, 2, 3], swap=(0, 1))
    ev.process(inputs[2:], outputs[2:])
    ev.process(inputs[:2], outputs[:2])  # arrival order does not matter
    res = ev.evaluate()["retrieval"]
    assert ev.image_ids == [0, 1, 2, 3]
    # TR@1: every image still has one caption equal to itself, but caption "1 of image 0" equals
    # e_1 and ties with image 1's own caption 2 at a lower column -> image 1 loses at k=1; same
    # for image 2 (column 3 = e_2 precedes column 4). Images 0 and 3 hit.
    assert res["TR@1"] == 50.0 and res["TR@5"] == 100.0
    # IR@1: the two swapped captions point to the wrong image (6 of 8 right).
    assert res["IR@1"] == 75.0

    ev.reset()
    res = ev.evaluate()["retrieval"]
    assert math.isnan(res["TR@1"])


def test_evaluator_rerank_hook_and_errors():
    seen = {}

    def rerank(sim, k):
        seen["shape"], seen["k"] = tuple(sim.shape), k
        return -sim  # an adversarial re-scoring: the right pairs end up last

    ev = RetrievalEvaluator("toy", rerank_fn=rerank, rerank_k=3, distributed=False)
    ev.process(*_outputs([0, 1, 2, 3]))
    res = ev.evaluate()["retrieval"]
    assert seen == {"shape": (4, 8), "k": 3}
    assert res["TR@1"] == 0.0 and res["IR@1"] == 0.0

    with pytest.raises(ValueError, match="image 5"):
        ev.process(
            [{"image_id": 5}],
            [{"image_embedding": torch.ones(4), "text_embeddings": torch.ones(2, 3)}],
        )
    with pytest.raises(ValueError, match="3 captions"):
        ev.process(
            [{"image_id": 5, "captions": ["a", "b", "c"]}],
            [{"image_embedding": torch.ones(4), "text_embeddings": torch.ones(2, 4)}],
        )


def _gather(rank: int):
    inputs, outputs = _outputs([0, 1, 2, 3], swap=(0, 1))
    ev = RetrievalEvaluator("toy", distributed=True)
    ev.reset()
    mine = [rank, rank + 2]  # rank 0: images 0, 2; rank 1: images 1, 3
    ev.process([inputs[i] for i in mine], [outputs[i] for i in mine])
    return ev.evaluate()


@pytest.mark.long(0.5)
def test_two_process_gather(tmp_path):
    rank0, rank1 = run_two_ranks(_gather, tmp_path)
    assert rank1 == {}
    single = RetrievalEvaluator("toy", distributed=False)
    single.process(*_outputs([0, 1, 2, 3], swap=(0, 1)))
    assert rank0 == json.loads(json.dumps(single.evaluate()))
    assert rank0["retrieval"]["TR@1"] == 50.0 and rank0["retrieval"]["IR@1"] == 75.0


def test_evaluator_scores_are_cosine_similarities():
    """Spec 5.5: the score is the cosine of the embeddings, so their lengths do not count. Raw dot
    products would rank image 0 (length 10) first for caption 1 and caption 1 (length 5) first
    for image 0; as cosines each image and caption find their own partner."""
    ev = RetrievalEvaluator("toy", distributed=False)
    ev.process(
        [{"image_id": 0}, {"image_id": 1}],
        [
            {
                "image_embedding": torch.tensor([10.0, 0.0]),
                "text_embeddings": torch.tensor([[1.0, 0.0]]),
            },
            {
                "image_embedding": torch.tensor([0.6, 0.8]),
                "text_embeddings": torch.tensor([[3.0, 4.0]]),
            },
        ],
    )
    # cosines: [[1, 0.6], [0.6, 1]]: every pair is its row's and its column's best
    res = ev.evaluate()["retrieval"]
    assert res["TR@1"] == 100.0 and res["IR@1"] == 100.0
