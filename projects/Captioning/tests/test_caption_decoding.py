"""Beam / greedy search and sampling on a tiny fixed model (coarse spec §5.6)."""

import itertools
import math

import pytest
import torch
from captioning import beam_search, greedy_search, original_beam_search, sample_captions

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


def test_non_finite_logits_stop_decoding_with_one_line():
    model = ToyModel(4)
    args = dict(bos=BOS, eos=EOS, pad=PAD, banned=[MASK], max_length=5)
    for bad in (float("nan"), float("inf")):
        bias = torch.zeros(2, VOCAB)
        bias[1, 4] = bad  # a word (column 3, <mask>, is banned and overwritten)
        for decode, extra in (
            (sample_captions, dict(num_samples=3)),
            (greedy_search, {}),
            (beam_search, dict(beam_size=2)),
        ):
            with pytest.raises(FloatingPointError, match="logits are NaN or \\+inf"):
                decode(model.step, model.select, bias, 2, **extra, **args)


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


def _original_reference(model, bias, beam, max_length):
    """The original's beam search for one image, written out with lists from its rules
    (``original_beam_search``): finished hypotheses compete with every token at their own score and
    length; place p keeps the length computed for the hypothesis that held place p before."""

    def logp(tokens):
        logits = model.step(bias[None], torch.tensor([tokens]))[0][0].clone()
        logits[MASK] = -10000.0
        return torch.log_softmax(logits, dim=-1)

    first = logp([BOS])
    order = sorted(range(VOCAB), key=lambda v: -first[v].item())[:beam]
    one = torch.tensor(1.0)
    hyps = [([BOS, v], first[v], one, v in (EOS, PAD)) for v in order]
    while len(hyps[0][0]) < max_length and not all(h[3] for h in hyps):
        candidates = []
        lengths = [length + (0.0 if ended else 1.0) for _, _, length, ended in hyps]
        for j, (tokens, score, _, ended) in enumerate(hyps):
            lp = logp(tokens)
            for v in range(VOCAB):
                total = score + (0.0 if ended else lp[v])
                candidates.append(((total / (lengths[j] + 1e-9)).item(), j, v, total))
        candidates.sort(key=lambda c: -c[0])
        new = []
        for place, (_, j, v, total) in enumerate(candidates[:beam]):
            token = PAD if hyps[j][3] else v
            new.append((hyps[j][0] + [token], total, lengths[place], token in (EOS, PAD)))
        hyps = new
    return hyps[0][0]


@pytest.mark.parametrize("seed", range(6))
def test_original_beam_search_follows_the_original_rules(seed):
    model = ToyModel(seed)
    biases = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(seed + 20))
    for beam, max_length in ((2, 6), (3, 8), (5, 5)):
        ids, _ = original_beam_search(
            model.step, model.select, biases, 3, beam_size=beam, max_length=max_length,
            bos=BOS, eos=EOS, pad=PAD, banned=[MASK],
        )  # fmt: skip
        for b in range(3):
            expected = _original_reference(model, biases[b], beam, max_length)
            assert ids[b, : len(expected)].tolist() == expected, (beam, max_length, b)


class PrefixModel:
    """Next-token log-probabilities looked up by the whole prefix (missing prefixes: uniform)."""

    def __init__(self, table):
        self.table = table

    def step(self, state, prefix):
        rows = []
        for p in prefix.tolist():
            logits = torch.full((VOCAB,), -30.0)
            for token, lp in self.table.get(tuple(p), {}).items():
                logits[token] = lp
            rows.append(logits)
        return torch.stack(rows), state

    @staticmethod
    def select(state, index):
        return state


def _two_tokens(p, a, b):
    """Logits giving token a probability p and token b 1 - p (every other token ~e^-30 less)."""
    return {a: math.log(p), b: math.log(1.0 - p)}


ARGS = dict(bos=BOS, eos=EOS, pad=PAD, banned=[MASK], beam_size=2, max_length=6)
A = 4


def test_a_finished_hypothesis_ranked_first_ends_the_original_search():
    """Step 1 ranks the finished "</s>" (log 0.55 = -0.598) above "A A" ((log 0.45 + log 0.6) / 2
    = -0.655): its copies take both places and the original's search ends with "</s>", where
    searching every hypothesis to its end finds "A A </s>" at -1.31 / 3 = -0.437."""
    model = PrefixModel(
        {
            (BOS,): _two_tokens(0.55, EOS, A),
            (BOS, A): _two_tokens(0.6, A, EOS),
            (BOS, A, A): {EOS: 0.0},
        }
    )
    original, score = original_beam_search(model.step, model.select, None, 1, **ARGS)
    complete, best = beam_search(model.step, model.select, None, 1, **ARGS)
    assert original[0, 1:].tolist() == [EOS, PAD] and score.item() == pytest.approx(math.log(0.55))
    assert complete[0, 1:].tolist() == [A, A, EOS]
    assert best.item() == pytest.approx((math.log(0.45) + math.log(0.6)) / 3, abs=1e-4)


def test_the_original_carries_lengths_by_place():
    """Step 1 ranks "A A" ((log 0.45 + log 0.8) / 2 = -0.511) first and the finished "</s>"
    (log 0.55 = -0.598) second; place 0 ("A A") keeps the length of place 0's previous hypothesis
    ("</s>": 1), place 1 ("</s>") that of "A" (2). Step 2 then ranks "</s>" at -0.598 / 2 above
    "A A </s>" at -1.022 / 2 and the original's search ends with "</s>"; with lengths carried by
    hypothesis "A A </s>" wins (-1.022 / 3 = -0.341 against -0.598)."""
    model = PrefixModel(
        {
            (BOS,): _two_tokens(0.55, EOS, A),
            (BOS, A): _two_tokens(0.8, A, EOS),
            (BOS, A, A): {EOS: 0.0},
        }
    )
    original, score = original_beam_search(model.step, model.select, None, 1, **ARGS)
    complete, best = beam_search(model.step, model.select, None, 1, **ARGS)
    assert original[0, 1].item() == EOS and score.item() == pytest.approx(math.log(0.55) / 2)
    assert complete[0, 1:].tolist() == [A, A, EOS]
    assert best.item() == pytest.approx((math.log(0.45) + math.log(0.8)) / 3, abs=1e-4)


def test_beam_complete_ranks_candidates_by_their_length_normalised_score():
    """Every step keeps the K best candidates by cumulative log-probability / generated tokens,
    so a longer hypothesis with a lower total can displace a finished shorter one."""
    words = list(range(4, 30))  # 26 words (4 = a, 5 = b), the other 24 share the leftover mass
    a, b = 4, 5

    def dist(given):
        p = torch.zeros(30)
        p[list(given)] = torch.tensor(list(given.values()))
        rest = [w for w in words if w not in given]
        p[rest] = (1.0 - sum(given.values())) / len(rest)
        return p.clamp(min=1e-12).log()

    table = {
        (): dist({a: 0.5, EOS: 0.3}),  # beams: "a" (log 0.5), "</s>" (log 0.3)
        (a,): dist({a: 0.27, b: 0.25}),  # "a a": total -2.00, /2 = -1.00; "a b": -2.08, /2 = -1.04
        (a, a): dist({EOS: 0.05}),
        (a, b): dist({EOS: 0.95}),
    }

    def step(state, prefix):
        rows = [
            table.get(tuple(t for t in row[1:].tolist() if t != PAD), dist({})) for row in prefix
        ]
        return torch.stack(rows), state

    select = lambda state, index: state  # noqa: E731
    ids, score = beam_search(
        step, select, None, 1, bos=BOS, eos=EOS, pad=PAD, banned=[MASK], beam_size=2, max_length=4
    )
    # by normalised score "a a" (-1.00) and "a b" (-1.04) beat "</s>" (-1.20) at step 2, though
    # "</s>" has the higher total; "a b </s>" then wins with (log .5 + log .25 + log .95) / 3
    assert ids[0].tolist() == [BOS, a, b, EOS]
    expected = (math.log(0.5) + math.log(0.25) + math.log(0.95)) / 3
    assert score[0].item() == pytest.approx(expected, abs=1e-4)
