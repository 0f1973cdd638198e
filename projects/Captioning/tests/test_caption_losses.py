"""Captioning losses on hand-sized examples (coarse spec §5.6)."""

import math

import pytest
import torch
from captioning import (
    gold_loss,
    gold_weights,
    mle_loss,
    next_token_labels,
    reinforce_loss,
    sequence_logprob,
)

PAD = 1


def test_mle_labels_shift_left_and_ignore_padding():
    # <s>=0 w1=5 w2=6 </s>=2 then two pads: position t predicts token t + 1
    ids = torch.tensor([[0, 5, 6, 2, PAD, PAD]])
    labels = next_token_labels(ids, PAD)
    assert labels.tolist() == [[5, 6, 2, -100, -100, -100]]
    # a full-length caption: the appended pad makes the last position unlabelled
    assert next_token_labels(torch.tensor([[0, 5, 6, 2]]), PAD).tolist() == [[5, 6, 2, -100]]


def test_mle_loss_is_the_mean_over_labelled_positions_only():
    ids = torch.tensor([[0, 5, 6, 2, PAD, PAD]])
    labels = next_token_labels(ids, PAD)
    logits = torch.randn(1, 6, 8)
    logp = torch.log_softmax(logits, dim=-1)[0]
    expected = -(logp[0, 5] + logp[1, 6] + logp[2, 2]) / 3
    assert torch.allclose(mle_loss(logits, labels), expected)
    # what the model predicts after </s> does not matter
    changed = logits.clone()
    changed[0, 3:] = torch.randn(3, 8) * 10
    assert torch.allclose(mle_loss(changed, labels), expected)


def _logits_for(probs):
    """Logits whose softmax puts exactly ``p`` on token 0 of a 2-token vocabulary."""
    return torch.tensor([[math.log(p), math.log(1 - p)] for p in probs])[None]


def test_gold_weights_by_hand_on_three_tokens():
    # gold next tokens are all 0 with snapshot probabilities 0.5, 0.2, 0.8, then one pad position
    logits = torch.cat([_logits_for([0.5, 0.2, 0.8]), torch.zeros(1, 1, 2)], dim=1)
    labels = torch.tensor([[0, 0, 0, -100]])
    w = gold_weights(logits, labels, min_weight=0.1)
    # c_0 = (0.5+0.2+0.8)/3 = 0.5, c_1 = (0.2+0.8)/2 = 0.5, c_2 = 0.8
    # w = max(c*p, 0.1) = [0.25, max(0.1, 0.1), 0.64]; the pad position gets the floor
    assert torch.allclose(w, torch.tensor([[0.25, 0.1, 0.64, 0.1]]), atol=1e-6)
    assert not w.requires_grad


def test_gold_loss_divisors():
    logits = torch.randn(1, 5, 4, requires_grad=True)
    labels = torch.tensor([[2, 3, 1, -100, -100]])
    weights = torch.tensor([[0.5, 0.25, 1.0, 0.1, 0.1]])
    ce = torch.nn.functional.cross_entropy(logits[0, :3], labels[0, :3], reduction="none")
    weighted = (weights[0, :3] * ce).sum()
    natural = gold_loss(logits, labels, weights)
    original = gold_loss(logits, labels, weights, original_divisor=True)
    assert torch.allclose(natural, weighted / 3)  # three labelled tokens
    assert torch.allclose(original, weighted / (2 + 1e-9))  # two padding positions
    natural.backward()
    assert logits.grad[0, 3:].abs().sum() == 0


def test_reinforce_sign_and_constant_baseline():
    logprob = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    rewards = torch.tensor([1.5, 1.0, 0.2])  # above, at and below the baseline of 1.0
    loss = reinforce_loss(logprob, rewards, num_images=1, baseline=1.0)
    expected = (-1.0 * -50.0) + (-2.0 * 0.0) + (-0.5 * 80.0)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # gradient descent raises the log-probability of the sample above the baseline, lowers the one
    # below it, and leaves the one at the baseline alone
    assert logprob.grad[0] < 0 and logprob.grad[2] > 0 and logprob.grad[1] == 0
    # divided by the number of images, not of samples
    half = reinforce_loss(logprob.detach(), rewards, num_images=2, baseline=1.0)
    assert half.item() == pytest.approx(expected / 2)


def test_sequence_logprob_averages_generated_tokens():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[3, 2, -100, -100], [4, 5, 2, -100]])
    logp = torch.log_softmax(logits, dim=-1)
    got = sequence_logprob(logits, labels)
    assert torch.allclose(got[0], (logp[0, 0, 3] + logp[0, 1, 2]) / 2, atol=1e-6)
    assert torch.allclose(got[1], (logp[1, 0, 4] + logp[1, 1, 5] + logp[1, 2, 2]) / 3, atol=1e-6)
