"""Beam / greedy search and sampling on a tiny fixed model (coarse spec §5.6)."""

import itertools

import pytest
import torch
from captioning import beam_search, greedy_search, sample_captions

BOS, PAD, EOS, MASK = 0, 1, 2, 3
VOCAB = 6  # 4 specials + two words (4, 5)


class ToyModel:
    """Next-token logits from a fixed random table indexed by (previous token, position), plus
    a per-image bias; ``state`` is the (N, V) image bias."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(VOCAB, 8, VOCAB, generator=g) * 2.0

    def step(self, state, prefix):
        last = prefix[:, -1]
        pos = torch.full_like(last, prefix.shape[1] - 1)
        return self.table[last, pos] + state, state

    @staticmethod
    def select(state, index):
        return state.index_select(0, index)

    def logp(self, bias, seq):
        """log P of the generated tokens of ``seq`` (a tuple, <s> excluded) for one image."""
        prefix = [BOS]
        total = 0.0
        for tok in seq:
            logits = self.table[prefix[-1], len(prefix) - 1] + bias
            logits = logits.clone()
            logits[MASK] = -10000.0
            total += torch.log_softmax(logits, dim=-1)[tok].item()
            prefix.append(tok)
        return total


def _exhaustive(model, bias, max_new):
    """Best length-normalised sequence over every sequence of <= max_new tokens that ends at
    </s> / pad or reaches the length limit (<mask> excluded)."""
    words = [t for t in range(VOCAB) if t != MASK]  # only <mask> is banned, as the original
    best = None
    for n in range(1, max_new + 1):
        for seq in itertools.product(words, repeat=n):
            ends = [i for i, t in enumerate(seq) if t in (EOS, PAD)]
            if ends and ends[0] != n - 1:
                continue  # a finished hypothesis only pads (at no cost)
            if not ends and n < max_new:
                continue  # unfinished sequences stop only at the limit
            score = model.logp(bias, seq) / n
            if best is None or score > best[0]:
                best = (score, seq)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_matches_exhaustive_search_at_length_3(seed):
    model = ToyModel(seed)
    biases = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(seed + 10))
    args = dict(bos=BOS, eos=EOS, pad=PAD, banned=[MASK], max_length=4)
    # a beam as wide as every 2-token prefix prunes nothing: beam search is then exact
    ids, scores = beam_search(model.step, model.select, biases, 2, beam_size=VOCAB**2, **args)
    for b in range(2):
        score, seq = _exhaustive(model, biases[b], 3)
        got = [t for t in ids[b, 1:].tolist()]
        got = got[: next((i + 1 for i, t in enumerate(got) if t in (EOS, PAD)), len(got))]
        assert tuple(got) == seq
        assert scores[b].item() == pytest.approx(score, abs=1e-5)
    # the default beam of 5 never scores above the optimum
    ids5, scores5 = beam_search(model.step, model.select, biases, 2, beam_size=5, **args)
    for b in range(2):
        assert scores5[b].item() <= _exhaustive(model, biases[b], 3)[0] + 1e-6


def test_generation_never_exceeds_max_length_and_finished_rows_only_pad():
    model = ToyModel(3)
    bias = torch.zeros(3, VOCAB)
    bias[:, EOS] = -50.0  # never ends by itself
    bias[:, PAD] = -50.0
    args = dict(bos=BOS, eos=EOS, pad=PAD, banned=[MASK])
    for max_length in (2, 5, 9):
        ids, _ = beam_search(
            model.step, model.select, bias, 3, beam_size=5, max_length=max_length, **args
        )
        assert ids.shape[1] == max_length
        assert (
            greedy_search(model.step, model.select, bias, 3, max_length=max_length, **args).shape[1]
            == max_length
        )
    # mixed: a batch whose rows end early keeps padding them
    bias = torch.zeros(2, VOCAB)
    bias[0, EOS] = 50.0  # ends at once
    bias[1, EOS] = -50.0
    bias[1, PAD] = -50.0
    ids = greedy_search(model.step, model.select, bias, 2, max_length=6, **args)
    assert ids[0, 1].item() == EOS and (ids[0, 2:] == PAD).all()
    assert MASK not in ids.tolist()
    with pytest.raises(ValueError, match="max_length"):
        greedy_search(model.step, model.select, bias, 2, max_length=1, **args)


def test_greedy_is_beam_of_one_and_samples_follow_the_rules():
    model = ToyModel(4)
    bias = torch.randn(3, VOCAB)
    args = dict(bos=BOS, eos=EOS, pad=PAD, banned=[MASK], max_length=7)
    greedy = greedy_search(model.step, model.select, bias, 3, **args)
    beam1, _ = beam_search(model.step, model.select, bias, 3, beam_size=1, **args)
    assert torch.equal(greedy, beam1)
    g = torch.Generator().manual_seed(0)
    samples = sample_captions(model.step, model.select, bias, 3, 5, generator=g, **args)
    assert samples.shape[0] == 15 and samples.shape[1] <= 7
    assert (samples[:, 0] == BOS).all() and MASK not in samples.tolist()
    for row in samples.tolist():
        ends = [i for i, t in enumerate(row) if t in (EOS, PAD)]
        if ends:
            assert all(t == PAD for t in row[ends[0] + 1 :])


def test_samples_follow_the_softmax_at_temperature_one():
    """Empirical first-token frequencies of many samples match softmax(logits) (temperature 1,
    <mask> banned) of each image, to within 4 standard errors."""
    model = ToyModel(1)
    bias = torch.stack([torch.zeros(VOCAB), torch.tensor([0.0, 1.0, -1.0, 0.0, 0.5, 0.0])])
    n = 3000
    g = torch.Generator().manual_seed(0)
    args = dict(bos=BOS, eos=EOS, pad=PAD, banned=[MASK], max_length=2)
    samples = sample_captions(model.step, model.select, bias, 2, n, generator=g, **args)
    for b in range(2):
        logits = model.table[BOS, 0] + bias[b]
        logits[MASK] = -10000.0
        expected = torch.softmax(logits, dim=-1)
        counts = torch.bincount(samples[b * n : (b + 1) * n, 1], minlength=VOCAB).float()
        assert torch.allclose(counts / n, expected, atol=4 * (0.25 / n) ** 0.5)
