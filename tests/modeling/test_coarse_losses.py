"""ITC / hard-negative / MLM objectives against hand computations."""

import math

import pytest
import torch

from fiber_d2.modeling.meta_arch.coarse_losses import (
    FeatureQueue,
    itc_logits,
    itc_loss,
    mlm_loss,
    sample_hard_negatives,
)


def test_itc_matches_hand_computation():
    f_i = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    iq = torch.tensor([[1.0], [1.0]])  # (D, Q=1)
    tq = torch.tensor([[0.0], [-1.0]])
    temp = torch.tensor(0.5)
    sim_i2t, sim_t2i = itc_logits(f_i, f_t, iq, tq, temp)
    # row 0 of i2t: [f_i0.f_t0, f_i0.f_t1, f_i0.tq] / 0.5 = [1.2, 0, 0]
    assert torch.allclose(sim_i2t[0], torch.tensor([1.2, 0.0, 0.0]))
    # row 1 of t2i: [f_t1.f_i0, f_t1.f_i1, f_t1.iq] / 0.5 = [0, 2, 2]
    assert torch.allclose(sim_t2i[1], torch.tensor([0.0, 2.0, 2.0]))

    def ce(row, target):
        return -row[target] + math.log(sum(math.exp(v) for v in row))

    rows_i2t = sim_i2t.tolist()
    rows_t2i = sim_t2i.tolist()
    expected = 0.5 * (
        (ce(rows_i2t[0], 0) + ce(rows_i2t[1], 1)) / 2
        + (ce(rows_t2i[0], 0) + ce(rows_t2i[1], 1)) / 2
    )
    assert itc_loss(sim_i2t, sim_t2i).item() == pytest.approx(expected, rel=1e-6)


def test_itc_in_batch_columns_are_detached():
    f_i = torch.randn(3, 4, requires_grad=True)
    f_t = torch.randn(3, 4, requires_grad=True)
    sim_i2t, _ = itc_logits(f_i, f_t, torch.randn(4, 2), torch.randn(4, 2), torch.tensor(0.07))
    sim_i2t.sum().backward()
    assert f_i.grad is not None and f_t.grad is None  # i2t trains only the image side


def test_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 6)
    sim[torch.arange(4), torch.tensor([1, 2, 3, 4])] = 50.0  # positives dominate the softmax
    positive = torch.tensor([1, 2, 3, 4])
    for _ in range(200):
        picks = sample_hard_negatives(sim, positive, generator=g)
        assert (picks != positive).all()


def test_hard_negatives_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[0.0, 10.0, 0.0, 0.0]])  # column 1 is the hardest negative
    picks = torch.stack(
        [sample_hard_negatives(sim, torch.tensor([0]), generator=g) for _ in range(100)]
    )
    assert (picks == 1).float().mean() > 0.9


def test_hard_negatives_of_non_finite_similarities_are_drawn_uniformly(caplog):
    """NaN / +inf similarities (fp16 overflow) stopped the run here, even under AMP, where the
    trainer skips a non-finite step and goes on; such rows now draw uniformly, never the positive.
    """
    g = torch.Generator().manual_seed(0)
    for bad in (float("nan"), float("inf")):
        sim = torch.zeros(2, 3)
        sim[0, 0] = 30.0  # a finite row keeps its softmax
        sim[1, 2] = bad
        with caplog.at_level("WARNING"):
            picks = torch.stack(
                [sample_hard_negatives(sim, torch.tensor([1, 1]), generator=g) for _ in range(300)]
            )
        assert "similarities of 1 of 2 samples are NaN or +inf" in caplog.text
        assert (picks[:, 0] == 0).all()  # the finite row: its hard negative
        counts = torch.bincount(picks[:, 1], minlength=3)
        assert counts[1] == 0 and min(counts[0], counts[2]) > 100  # uniform, not the positive


def test_mlm_ignores_unmasked_tokens():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.tensor([[-100, 2, -100]])
    loss = mlm_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[0, 1:2], torch.tensor([2]))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    none_masked = mlm_loss(logits, torch.full((1, 3), -100))
    assert none_masked.item() == 0.0 and none_masked.requires_grad


def test_queue_wraps_and_counts():
    q = FeatureQueue(dim=2, size=3)
    q.enqueue(torch.ones(2, 2), torch.ones(2, 2))
    q.enqueue(torch.full((2, 2), 2.0), torch.full((2, 2), 2.0))
    assert q.queue_ptr.item() == 1 and q.queue_total.item() == 4
    assert torch.equal(q.image_queue[0], torch.tensor([2.0, 1.0, 2.0]))
