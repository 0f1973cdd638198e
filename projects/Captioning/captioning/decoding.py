"""Caption decoding: length-normalised beam search, greedy search and sampling (coarse spec §5.6).

The searches are independent of the model: they drive a ``step`` function

    step(state, prefix) -> (logits (N, V) of the next token, new state)

where ``prefix`` (N, t) holds every token so far (``<s>`` first) and ``state`` is whatever the model
keeps between steps (the image tokens when it re-encodes the prefix, a key/value cache when it
does not), and a ``select(state, index)`` that keeps/reorders/repeats rows of the state.

Common rules: ``banned`` token ids (``<mask>``) get logit -10000 as in the original; a hypothesis
is finished once it emits ``</s>`` or ``<pad>`` and then only pads; ``max_length`` bounds the whole
sequence including ``<s>``, so at most ``max_length - 1`` tokens are generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "beam_search",
    "original_beam_search",
    "greedy_search",
    "sample_captions",
    "BANNED_LOGIT",
    "DECODINGS",
]

BANNED_LOGIT = -10000.0
# CAPTION.DECODING: "beam" the original's beam search, "beam_complete" every hypothesis searched to
# its end (finished ones keep one place), "greedy"
DECODINGS = ("beam", "beam_complete", "greedy")

Step = Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]]
Select = Callable[[Any, torch.Tensor], Any]


def _log_probs(logits: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    logits = logits.float().clone()
    if banned:
        logits[:, list(banned)] = BANNED_LOGIT
    logp = torch.log_softmax(logits, dim=-1)
    if torch.isnan(logp).any():
        # NaN (or +inf) logits, e.g. an fp16 overflow under autocast: torch.multinomial would stop
        # with a device-side assert on CUDA, top-k would pick garbage
        raise FloatingPointError(
            "caption decoding: the decoder's logits are NaN or +inf (an fp16 overflow? decode in "
            "bf16 or fp32)"
        )
    return logp


def _check(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (<s> and one token), got {max_length}")


def _only_pad(logp: torch.Tensor, finished: torch.Tensor, pad: int) -> torch.Tensor:
    """Finished rows: log-probability 0 for pad, -inf for everything else."""
    if finished.any():
        logp = logp.masked_fill(finished[:, None], float("-inf"))
        logp[finished, pad] = 0.0
    return logp


def _first_beams(step, select, state, batch_size, bos, banned, beam_size, device):
    """The first step of both beam searches: the K best first tokens of each image.

    Returns:
        (B*K, 2) ids (``<s>``, token), the state repeated K times per image, (B, K) log-probs
        (best first), K.
    """
    ids = torch.full((batch_size, 1), bos, dtype=torch.long, device=device)
    logits, state = step(state, ids)
    logp = _log_probs(logits, banned)
    k = min(beam_size, logp.shape[1])
    score, token = logp.topk(k, dim=1)  # (B, K), best first
    rows = torch.arange(batch_size, device=device).repeat_interleave(k)
    ids = torch.cat([ids[rows], token.reshape(-1, 1)], dim=1)
    return ids, select(state, rows), score, k


def _beam_start(ids, score, eos, pad):
    """Flat (B*K,) scores, lengths (1) and finished flags of the first beams, and (B, 1) row
    offsets of each image's K places."""
    batch_size, k = score.shape
    finished = (ids[:, -1] == eos) | (ids[:, -1] == pad)
    offsets = torch.arange(batch_size, device=ids.device)[:, None] * k
    score = score.reshape(-1)
    return score, torch.ones_like(score), finished, offsets


def _pick(total, normalised, offsets):
    """The K best of each image's K*V candidates by ``normalised`` (B, K*V), from the cumulative
    log-probs ``total`` (B*K, V): their ranking values (B, K); source rows, tokens and cumulative
    scores (B*K,)."""
    vocab = total.shape[1]
    k = normalised.shape[1] // vocab
    ranked, best = normalised.topk(k, dim=1)
    source = (best // vocab + offsets).reshape(-1)
    token = (best % vocab).reshape(-1)
    score = total.view(-1, k * vocab).gather(1, best).reshape(-1)
    return ranked, source, token, score


@torch.no_grad()
def beam_search(
    step: Step,
    select: Select,
    state: Any,
    batch_size: int,
    *,
    bos: int,
    eos: int,
    pad: int,
    banned: Sequence[int] = (),
    beam_size: int = 5,
    max_length: int = 50,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search ranked by cumulative log-probability / number of generated tokens, every
    hypothesis searched to its end (``CAPTION.DECODING`` "beam_complete").

    The first step keeps the ``beam_size`` best first tokens; every later step expands each
    hypothesis (a finished one only by pad, at no cost and no length) and keeps the ``beam_size``
    best length-normalised candidates per image. Stops when every hypothesis is finished or the
    sequence reaches ``max_length``.

    Args:
        step, select, state: the model (module docstring); ``state`` has ``batch_size`` rows.
        batch_size: images B.
        bos, eos, pad: ``<s>``, ``</s>`` and ``<pad>`` ids.
        banned: ids never generated.
        beam_size: hypotheses per image K.
        max_length: longest sequence, ``<s>`` included.
        device: device of the token tensors.

    Returns:
        (B, L) ids of the best hypothesis (``<s>`` first, then tokens, ``</s>``/pads), L <=
        ``max_length``; (B,) its normalised score.
    """
    _check(max_length)
    ids, state, score, k = _first_beams(
        step, select, state, batch_size, bos, banned, beam_size, device
    )
    score, length, finished, offsets = _beam_start(ids, score, eos, pad)
    while ids.shape[1] < max_length and not bool(finished.all()):
        logits, state = step(state, ids)
        logp = _only_pad(_log_probs(logits, banned), finished, pad)
        new_length = length + (~finished).float()
        total = score[:, None] + logp  # (B*K, V)
        normalised = (total / new_length[:, None]).view(batch_size, -1)
        _, source, token, score = _pick(total, normalised, offsets)
        length = new_length[source]
        was_finished = finished[source]
        ids = torch.cat([ids[source], token[:, None]], dim=1)
        finished = was_finished | (token == eos) | (token == pad)
        state = select(state, source)
    normalised = (score / length).view(batch_size, k)
    top = normalised.argmax(dim=1)
    chosen = torch.arange(batch_size, device=device) * k + top
    return ids[chosen], normalised.gather(1, top[:, None])[:, 0]


@torch.no_grad()
def original_beam_search(
    step: Step,
    select: Select,
    state: Any,
    batch_size: int,
    *,
    bos: int,
    eos: int,
    pad: int,
    banned: Sequence[int] = (),
    beam_size: int = 5,
    max_length: int = 50,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original FIBER's beam search (``CAPTION.DECODING`` "beam"), which released caption
    checkpoints were evaluated with. Ranking, first step and stopping as :func:`beam_search`, but:

    * a finished hypothesis takes part in every later step with each of the V tokens, all at its
      own score and length (the token written is pad): its copies compete for the K places like
      any candidate, so once a finished hypothesis ranks first, all K places can become copies of
      it and the search ends;
    * place j carries on the length computed for the hypothesis that held place j before the
      step, not for the one it now continues (the original does not reorder the lengths with the
      hypotheses);
    * the answer is place 0 after the last step (the best-ranked candidate of that step);
    * the search stops when every hypothesis of the whole batch has ended, so an image whose
      hypotheses ended early takes further steps (and re-rankings) while the others decode: its
      answer can depend on the images decoded with it.

    Arguments and returns as :func:`beam_search` (the score: the ranking value of the answer).
    """
    _check(max_length)
    ids, state, score, k = _first_beams(
        step, select, state, batch_size, bos, banned, beam_size, device
    )
    ranked = score
    score, length, finished, offsets = _beam_start(ids, score, eos, pad)
    while ids.shape[1] < max_length and not bool(finished.all()):
        logits, state = step(state, ids)
        open_ = (~finished).float()
        logp = _log_probs(logits, banned) * open_[:, None]  # a finished row: 0 for every token
        candidate_length = length + open_
        total = score[:, None] + logp  # (B*K, V)
        normalised = (total / (candidate_length[:, None] + 1e-9)).view(batch_size, -1)
        ranked, source, token, score = _pick(total, normalised, offsets)  # ranked: best first
        length = candidate_length  # not candidate_length[source]: as the original
        token = torch.where(finished[source], torch.full_like(token, pad), token)
        ids = torch.cat([ids[source], token[:, None]], dim=1)
        finished = (token == eos) | (token == pad)
        state = select(state, source)
    first = torch.arange(batch_size, device=device) * k
    return ids[first], ranked[:, 0]


@torch.no_grad()
def greedy_search(
    step: Step,
    select: Select,
    state: Any,
    batch_size: int,
    *,
    bos: int,
    eos: int,
    pad: int,
    banned: Sequence[int] = (),
    max_length: int = 50,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The most probable next token at every step (arguments as :func:`beam_search`).

    Returns:
        (B, L) ids, ``<s>`` first, L <= ``max_length``.
    """
    _check(max_length)
    ids = torch.full((batch_size, 1), bos, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    while ids.shape[1] < max_length and not bool(finished.all()):
        logits, state = step(state, ids)
        token = _only_pad(_log_probs(logits, banned), finished, pad).argmax(dim=1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished = finished | (token == eos) | (token == pad)
    return ids


@torch.no_grad()
def sample_captions(
    step: Step,
    select: Select,
    state: Any,
    batch_size: int,
    num_samples: int,
    *,
    bos: int,
    eos: int,
    pad: int,
    banned: Sequence[int] = (),
    max_length: int = 50,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``num_samples`` captions per image, each token drawn from the softmax at temperature 1.

    The original draws the first tokens of the samples with replacement from the first-step
    distribution, then one token per sample; drawing every sample independently from the first
    step on is the same distribution.

    Returns:
        (B * num_samples, L) ids, the samples of image b in rows b*n .. b*n + n - 1.
    """
    _check(max_length)
    rows = torch.arange(batch_size, device=device).repeat_interleave(num_samples)
    state = select(state, rows)
    n = batch_size * num_samples
    ids = torch.full((n, 1), bos, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    while ids.shape[1] < max_length and not bool(finished.all()):
        logits, state = step(state, ids)
        probs = _only_pad(_log_probs(logits, banned), finished, pad).exp()
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished = finished | (token == eos) | (token == pad)
    return ids
