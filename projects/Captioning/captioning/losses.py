"""Captioning losses (coarse spec §5.6): next-token MLE, GOLD token weights, CIDEr-D REINFORCE.

All take the logits of the causal forward on ``<s> w1 ... wn </s> <pad> ...``: position t predicts
token t + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "next_token_labels",
    "mle_loss",
    "gold_weights",
    "gold_loss",
    "sequence_logprob",
    "reinforce_loss",
]


def next_token_labels(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Labels of the causal LM: the ids shifted left by one with a pad appended; pads -> -100.

    Args:
        input_ids: (B, T) ``<s> w1 ... wn </s> <pad>...``.
        pad_id: padding id.

    Returns:
        (B, T) long labels; the last real position (``wn``) has label ``</s>``.
    """
    pad = torch.full_like(input_ids[:, :1], pad_id)
    labels = torch.cat([input_ids[:, 1:], pad], dim=1)
    return labels.masked_fill(labels == pad_id, -100)


def mle_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled positions.

    Args:
        logits: (B, T, V).
        labels: (B, T) from :func:`next_token_labels`.
    """
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def gold_weights(
    frozen_logits: torch.Tensor, labels: torch.Tensor, min_weight: float = 0.1
) -> torch.Tensor:
    """GOLD token weights from a frozen snapshot's logits (Pang & He; original ``caption_gold``).

    ``p_t`` = snapshot probability of the gold next token (0 at unlabelled positions); ``c_t`` =
    mean of ``p`` over the labelled positions >= t; ``w_t = max(c_t * p_t, min_weight)``.

    Args:
        frozen_logits: (B, T, V) logits of the frozen snapshot (eval mode).
        labels: (B, T) labels (-100 where there is none).
        min_weight: lower bound of a weight.

    Returns:
        (B, T) detached weights (unlabelled positions get ``min_weight``; their loss is 0).
    """
    valid = labels != -100
    # the original takes exp(log(softmax + 1e-9))
    probs = torch.softmax(frozen_logits.float(), dim=-1) + 1e-9
    p = probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    p = p.masked_fill(~valid, 0.0)
    suffix_sum = p.flip(1).cumsum(1).flip(1)
    suffix_len = valid.float().flip(1).cumsum(1).flip(1).clamp(min=1.0)
    return torch.clamp(suffix_sum / suffix_len * p, min=min_weight)


def gold_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    original_divisor: bool = False,
) -> torch.Tensor:
    """Weighted cross-entropy of the GOLD stage.

    Args:
        logits: (B, T, V) logits of the trained model.
        labels: (B, T) labels (-100 where there is none).
        weights: (B, T) from :func:`gold_weights`.
        original_divisor: divide each sequence by its number of unlabelled (padding) positions
            + 1e-9, as the original code does; False divides by the number of labelled tokens.

    Returns:
        scalar: mean over the batch of the per-sequence normalised weighted sums.
    """
    ce = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    ).view_as(weights)
    summed = (weights * ce).sum(dim=1)
    valid = (labels != -100).sum(dim=1).float()
    if original_divisor:
        divisor = (labels.shape[1] - valid) + 1e-9
    else:
        divisor = valid.clamp(min=1.0)
    return (summed / divisor).mean()


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each sequence's labelled tokens (the RL stage's ``r_i``).

    Args:
        logits: (N, T, V).
        labels: (N, T) (-100 where there is none).

    Returns:
        (N,) mean over labelled positions of log P(label).
    """
    valid = labels != -100
    logp = torch.log(torch.softmax(logits, dim=-1) + 1e-9)  # as the original
    token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(~valid, 0.0)
    return token.sum(dim=1) / (valid.sum(dim=1).float() + 1e-9)


def reinforce_loss(
    logprob: torch.Tensor, rewards: torch.Tensor, num_images: int, baseline: float = 1.0
) -> torch.Tensor:
    """REINFORCE with a constant baseline: ``sum_i r_i * 100 * (baseline - s_i) / num_images``.

    Minimising it raises the probability of samples scoring above the baseline and lowers it for
    those below.

    Args:
        logprob: (N,) :func:`sequence_logprob` of the samples (with gradient).
        rewards: (N,) CIDEr-D of each sample (no gradient).
        num_images: images in the batch (the original divides by them, not by N).
        baseline: constant baseline in CIDEr-D units (original 1.0).
    """
    advantage = 100.0 * (baseline - rewards.to(logprob))
    return (logprob * advantage).sum() / num_images
