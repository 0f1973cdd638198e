"""topk_rerank / stable_topk / ITMPairScorer on hand-built similarities and stub scorers."""

import pytest
import torch
from retrieval.rerank import ITMPairScorer, stable_topk, topk_rerank
from torch import nn

from fiber_d2.evaluation import retrieval_recall


def _order(values):
    """Indices of ``values`` best first, ties lower index first (plain Python reference)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


class _TableScorer:
    """Stub ITM: looks the pair up in a hand-made table and records every call."""

    def __init__(self, table):
        self.table = table
        self.pairs = []

    def __call__(self, image_index, text_index):
        self.pairs += list(zip(image_index.tolist(), text_index.tolist()))
        return self.table[image_index, text_index]


# 3 images x 5 texts (captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2).
SIM = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.7, 0.2],
        [0.5, 0.6, 0.4, 0.95, 0.3],
        [0.3, 0.3, 0.3, 0.1, 0.35],
    ]
)
# ITM "truth": every caption's own image scores 5, others by hand, all distinct per row / column.
ITM = torch.tensor(
    [
        [5.0, 5.1, -1.0, -2.0, -3.0],
        [-1.5, -0.5, 5.2, 5.3, -2.5],
        [-0.7, -0.3, -0.2, -0.4, 5.4],
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2])


def test_stable_topk_matches_a_python_sort_with_ties():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    got = stable_topk(scores, 3)
    expected = [_order(row)[:3] for row in scores.tolist()]
    assert got.tolist() == expected == [[1, 2, 4], [4, 0, 1]]


def test_stable_topk_over_many_rows_and_many_ties():
    """More rows than one sorting chunk and rows long enough for an unstable sort to reorder ties:
    every row still matches the Python reference (best first, equal scores lower index first)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (2 * 256 + 5, 150), generator=g).float()
    got = stable_topk(scores, 40)
    assert got.tolist() == [_order(row)[:40] for row in scores.tolist()]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_text_retrieval_reorders_only_each_images_top_k(k):
    scorer = _TableScorer(ITM)
    sim_tr, _ = topk_rerank(SIM, k, scorer)
    for i in range(SIM.shape[0]):
        itc = _order(SIM[i].tolist())
        top, rest = itc[:k], itc[k:]
        expected = sorted(top, key=lambda t: (-ITM[i, t].item(), t)) + rest
        assert _order(sim_tr[i].tolist()) == expected, (i, k)
        for t in top:  # re-scored entries hold the ITM score itself
            assert sim_tr[i, t].item() == pytest.approx(ITM[i, t].item())


@pytest.mark.parametrize("k", [1, 2])
def test_image_retrieval_reorders_only_each_texts_top_k(k):
    _, sim_ir = topk_rerank(SIM, k, _TableScorer(ITM))
    for t in range(SIM.shape[1]):
        itc = _order(SIM[:, t].tolist())
        top, rest = itc[:k], itc[k:]
        expected = sorted(top, key=lambda i: (-ITM[i, t].item(), i)) + rest
        assert _order(sim_ir[:, t].tolist()) == expected, (t, k)


def test_each_pair_is_scored_once_and_only_candidates_are_scored():
    scorer = _TableScorer(ITM)
    topk_rerank(SIM, 2, scorer)
    tr = {(i, t) for i in range(3) for t in _order(SIM[i].tolist())[:2]}
    ir = {(i, t) for t in range(5) for i in _order(SIM[:, t].tolist())[:2]}
    assert len(scorer.pairs) == len(set(scorer.pairs))
    assert set(scorer.pairs) == tr | ir


def test_recall_after_reranking_by_hand():
    # ITC alone: each image's best text is its own (0.9 -> text 0, 0.95 -> text 3, 0.35 -> text 4).
    itc = retrieval_recall(SIM, TEXT_TO_IMAGE, (1,))
    assert itc["TR@1"] == pytest.approx(100.0)
    # IR@1 with ITC: text0->img0 ok, text1->img1 (0.6) miss, text2->img0 miss, text3->img1 ok,
    # text4->img2 ok: 3/5.
    assert itc["IR@1"] == pytest.approx(60.0)
    sim_tr, sim_ir = topk_rerank(SIM, 2, _TableScorer(ITM))
    out = retrieval_recall(sim_tr, TEXT_TO_IMAGE, (1,), sim_t2i=sim_ir)
    # Texts 0, 2, 3, 4 have their image in the ITC top-2 and ITM puts it first; text 1's image 0 is
    # ITC-last (0.1 < 0.3 < 0.6), outside the top-2, and stays a miss: 4/5.
    assert out["IR@1"] == pytest.approx(80.0)
    assert out["TR@1"] == pytest.approx(100.0)
    sim_tr3, sim_ir3 = topk_rerank(SIM, 3, _TableScorer(ITM))
    assert retrieval_recall(sim_tr3, TEXT_TO_IMAGE, (1,), sim_t2i=sim_ir3)["IR@1"] == pytest.approx(
        100.0
    )
    # k = 1 changes nothing: the single candidate stays first.
    sim_tr1, sim_ir1 = topk_rerank(SIM, 1, _TableScorer(ITM))
    assert retrieval_recall(sim_tr1, TEXT_TO_IMAGE, (1,), sim_t2i=sim_ir1)["IR@1"] == pytest.approx(
        60.0
    )


def test_k_larger_than_the_matrix_reranks_everything():
    sim_tr, sim_ir = topk_rerank(SIM, 100, _TableScorer(ITM))
    assert torch.equal(sim_tr, ITM) and torch.equal(sim_ir, ITM)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_rerank(SIM, 0, _TableScorer(ITM))
    with pytest.raises(ValueError, match="non-empty"):
        topk_rerank(torch.zeros(0, 3), 1, _TableScorer(ITM))
    with pytest.raises(ValueError, match="non-finite"):
        topk_rerank(SIM, 1, lambda i, t: torch.full(i.shape, float("nan")))
    with pytest.raises(ValueError, match="scores for"):
        topk_rerank(SIM, 1, lambda i, t: torch.zeros(1))


class _StubITMModel(nn.Module):
    """itm_logits column 1 = mean normalised pixel + 0.01 * sum of the real token ids."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([2.0, 2.0, 2.0]).view(-1, 1, 1))
        self.lin = nn.Linear(1, 1)
        self.modes = []
        self.batch_sizes = []

    def itm_logits(self, images, input_ids, attention_mask):
        self.modes.append(self.training)
        self.batch_sizes.append(images.shape[0])
        match = images.mean(dim=(1, 2, 3)) + 0.01 * (input_ids * attention_mask).sum(1).float()
        return torch.stack([-match, match], dim=1)


def test_itm_pair_scorer_batches_normalises_and_restores_train_mode():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 4, 4), generator=g, dtype=torch.uint8)
    ids = torch.randint(0, 50, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0
    model = _StubITMModel().train()
    scorer = ITMPairScorer(model, images, ids, mask, batch_size=2)
    img_idx = torch.tensor([0, 2, 1, 2, 0])
    txt_idx = torch.tensor([1, 1, 3, 0, 2])
    got = scorer(img_idx, txt_idx)
    mean = torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1)
    expected = [
        ((images[i].float() - mean) / 2.0).mean() + 0.01 * (ids[t] * mask[t]).sum()
        for i, t in zip(img_idx.tolist(), txt_idx.tolist())
    ]
    assert torch.allclose(got, torch.stack(expected).float(), atol=1e-5)
    assert model.batch_sizes == [2, 2, 1]
    assert model.modes == [False, False, False] and model.training


def test_itm_pair_scorer_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same"):
        ITMPairScorer(
            _StubITMModel(), torch.zeros(1, 3, 2, 2), torch.zeros(2, 4), torch.zeros(2, 3)
        )
    scorer = ITMPairScorer(
        _StubITMModel(), torch.zeros(1, 3, 2, 2), torch.zeros(2, 4), torch.zeros(2, 4)
    )
    with pytest.raises(ValueError, match="same shape"):
        scorer(torch.tensor([0]), torch.tensor([0, 1]))


def test_k_is_clamped_per_direction_when_images_outnumber_texts():
    """With 3 images and 2 texts, k = 3 re-scores every image of each text (IR) and both texts of
    each image (TR): all 6 pairs, so both matrices are the ITM table itself."""
    sim = SIM[:, :2]
    itm = ITM[:, :2]
    scorer = _TableScorer(itm)
    sim_tr, sim_ir = topk_rerank(sim, 3, scorer)
    assert sorted(scorer.pairs) == [(i, t) for i in range(3) for t in range(2)]
    assert torch.equal(sim_tr, itm) and torch.equal(sim_ir, itm)
