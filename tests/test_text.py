"""Tests of fiber_d2.text: names, prompts, tokenization, positive maps, chunking, sampling, MLM."""

import logging
import random
from collections import Counter

import pytest
import torch

from fiber_d2.data.shapes import build_shapes_tokenizer
from fiber_d2.text import (
    build_detection_prompt,
    build_prompt,
    build_tokenizer,
    char_spans_to_positive_map,
    chunk_names,
    clean_name,
    mask_tokens_for_mlm,
    prompt_token_lengths,
    sample_num_negatives,
    tokenize,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_shapes_tokenizer(tmp_path_factory.mktemp("tok"))


def overlap_reference(encoding, span, batch_index=0):
    """Independent reference: tokens whose (non-empty) char offsets intersect the span."""
    b, e = span
    offsets = encoding["offset_mapping"][batch_index].tolist()
    ids = encoding["input_ids"][batch_index].tolist()
    specials = {0, 1, 2}
    return {
        t
        for t, (s, f) in enumerate(offsets)
        if f > s and ids[t] not in specials and s < e and b < f
    }


def row_tokens(row):
    return set(torch.nonzero(row).flatten().tolist())


def test_clean_name():
    assert clean_name("bow_(decorative_ribbons)") == "bow "
    assert clean_name("traffic_light") == "traffic light"
    assert clean_name("a__b") == "a b"
    assert clean_name("a___b") == "a  b"  # only one level of double spaces collapsed
    assert clean_name("person") == "person"
    # greedy, as the original's regex: from the first "(" to the last ")"
    assert clean_name("a_(b)_c_(d)") == "a "


def test_build_prompt_spans_and_errors():
    names = ["red circle", "bow ", "café"]
    caption, spans = build_prompt(names)
    assert caption == "red circle. bow . café"
    assert [caption[s:e] for s, e in spans] == names
    caption, spans = build_prompt(["a", "b"], separator=" and ")
    assert caption == "a and b" and spans == [[0, 1], [6, 7]]
    with pytest.raises(ValueError, match="entry 1"):
        build_prompt(["ok", "  "])


def test_tokenize_pads_and_warns_on_truncation(tok, caplog):
    enc = tokenize(tok, ["a red circle", "a blue square left of a green triangle"], 8)
    assert enc["input_ids"].shape == (2, 8) and enc["attention_mask"].shape == (2, 8)
    ids = enc["input_ids"][0].tolist()
    n = int(enc["attention_mask"][0].sum())
    assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id
    assert all(i == tok.pad_token_id for i in ids[n:])
    assert enc["attention_mask"][0, n:].sum() == 0
    with caplog.at_level(logging.WARNING, logger="fiber_d2.text"):
        caplog.clear()
        tokenize(tok, "a red circle", 16)
        assert "truncated" not in caplog.text
        tokenize(tok, "a blue square left of a green triangle above a red circle", 6)
    assert "truncated" in caplog.text


def test_positive_map_word_spans_and_repeats(tok):
    caption = "red circle. red square. blue circle"
    enc = tokenize(tok, caption, 32)
    spans = [[[0, 10]], [[12, 22]], [[24, 35]], [[12, 15]], [[0, 3], [24, 28]]]
    pm = char_spans_to_positive_map(enc, spans, 32)
    assert pm.shape == (5, 32) and pm.dtype == torch.bool
    for r, row_spans in enumerate(spans):
        expected = set().union(*(overlap_reference(enc, s) for s in row_spans))
        assert row_tokens(pm[r]) == expected and expected
    # the second "red" maps to its own token, not to the first occurrence
    assert row_tokens(pm[3]).isdisjoint(row_tokens(pm[0]))


def test_positive_map_non_word_boundaries_and_spaces(tok):
    caption = "a small red circle"
    enc = tokenize(tok, caption, 16)
    # "ed ci": inside "red" up to inside "circle"
    pm = char_spans_to_positive_map(enc, [[[9, 14]], [[7, 11]], [[7, 8]]], 16)
    assert row_tokens(pm[0]) == overlap_reference(enc, (9, 14))
    # " red" starts on a space: retried at begin+1
    assert row_tokens(pm[1]) == overlap_reference(enc, (8, 11))
    # whitespace-only span: no token, skipped
    assert not pm[2].any()
    # trailing-space name (cleaned "bow_(x)" -> "bow "): end retried at end-2
    caption, spans = build_prompt(["bow ", "red circle"])
    enc = tokenize(tok, caption, 16)
    pm = char_spans_to_positive_map(enc, [[spans[0]]], 16)
    assert row_tokens(pm[0]) == overlap_reference(enc, (0, 3))


def test_positive_map_truncation_cut_off(tok):
    caption = "a red circle and a blue square and a green triangle"
    enc = tokenize(tok, caption, 8)  # room for 6 real tokens
    last_char = max(int(e) for _, e in enc["offset_mapping"][0].tolist())
    inside = [0, caption.index("circle") + len("circle")]
    cut = [caption.index("blue"), caption.index("square") + len("square")]
    gone = [caption.index("green"), len(caption)]
    assert inside[1] <= last_char < cut[1]
    pm = char_spans_to_positive_map(enc, [[inside], [cut], [gone]], 8)
    assert row_tokens(pm[0]) == overlap_reference(enc, inside)
    assert not pm[1].any() and not pm[2].any()


def test_positive_map_bad_spans(tok):
    enc = tokenize(tok, "a red circle", 8)
    with pytest.raises(ValueError, match="outside the caption"):
        char_spans_to_positive_map(enc, [[[2, 40]]], 8)
    with pytest.raises(ValueError, match="outside the caption"):
        char_spans_to_positive_map(enc, [[[5, 5]]], 8)
    with pytest.raises(ValueError, match="max_length"):
        char_spans_to_positive_map(enc, [[[0, 1]]], 16)


def test_chunk_names(tok):
    names = [f"{c} {k}" for c in ("red", "green", "blue", "yellow") for k in ("circle", "square")]
    names = names * 12  # 96 names
    chunks = chunk_names(names, 40, tok, 256)
    assert [len(c) for c in chunks] == [40, 40, 16]
    assert [i for c in chunks for i in c] == list(range(len(names)))
    # a tight token budget closes chunks early; every prompt fits
    chunks = chunk_names(names, 40, tok, 24)
    assert [i for c in chunks for i in c] == list(range(len(names)))
    for c in chunks:
        caption, _ = build_prompt([names[i] for i in c])
        assert len(tok.tokenize(caption)) <= 22
    assert chunk_names(names, -1, tok, 24) == [list(range(len(names)))]
    with pytest.raises(ValueError, match="too long name"):
        chunk_names(["ok", "too long name " * 10], 40, tok, 16)
    with pytest.raises(ValueError, match="category 1"):
        chunk_names(["ok", " "], 40, tok, 16)


def test_sample_num_negatives_distribution():
    rng = random.Random(0)
    counts = Counter(sample_num_negatives(rng, (0.05, 0.05, 0.5, 0.2), 85) for _ in range(8000))
    total = 8000
    # 5 % one, 5 % zero, 50 % full; the remaining 40 % uniform in 1..85
    assert abs(counts[0] / total - 0.05) < 0.015
    assert abs(counts[85] / total - (0.5 + 0.4 / 85)) < 0.03
    assert abs(counts[1] / total - (0.05 + 0.4 / 85)) < 0.015
    assert all(0 <= n <= 85 for n in counts)
    assert sum(v for n, v in counts.items() if 2 <= n <= 84) / total == pytest.approx(
        0.4 * 83 / 85, abs=0.03
    )
    assert {sample_num_negatives(rng, (0, 0, 1, 0), 85) for _ in range(50)} == {85}
    # the remaining mass is uniform in 1..85: never 0
    rest = Counter(sample_num_negatives(rng, (0, 0, 0, 1), 85) for _ in range(2000))
    assert min(rest) == 1 and max(rest) == 85 and len(rest) > 80
    with pytest.raises(ValueError, match="4 values"):
        sample_num_negatives(rng, (0.5, 0.5), 85)


def test_detection_prompt_invariants(tok):
    names = [f"{c} {k}" for c in ("red", "green", "blue", "yellow", "pink", "brown") for k in
             ("circle", "square", "triangle", "star", "heart")]  # fmt: skip
    lengths = prompt_token_lengths(tok, names)
    rng = random.Random(0)
    for _ in range(60):
        positives = rng.sample(range(len(names)), rng.randint(0, 8))
        max_tokens = rng.choice([10, 30, 254])
        caption, spans, kept = build_detection_prompt(
            positives + positives[:2],  # repeated labels are fine
            names,
            rng,
            random_sample_neg=rng.choice([0, 5, 85]),
            control_prob=(0.05, 0.05, 0.5, 0.2),
            max_tokens=max_tokens,
            tokenizer=tok,
        )
        assert set(kept) <= set(positives)
        assert set(kept) <= set(spans)  # every kept positive is in the caption
        assert set(spans) & set(positives) == set(kept)  # dropped positives are absent
        assert sum(lengths[c] for c in spans) <= max_tokens
        assert len(tok.tokenize(caption)) <= max_tokens
        for c, (s, e) in spans.items():
            assert caption[s:e] == names[c]
        if sum(lengths[c] for c in positives) <= max_tokens:
            assert sorted(kept) == sorted(set(positives))


def test_detection_prompt_control_options(tok):
    names = [f"name{i}" for i in range(12)]
    rng = random.Random(1)
    _, spans, kept = build_detection_prompt(
        [3, 5], names, rng, random_sample_neg=85, control_prob=(0, 1, 0, 0), tokenizer=tok
    )
    assert set(spans) == {3, 5} and kept == [3, 5]
    caption, spans, _ = build_detection_prompt(
        [3, 5], names, rng, random_sample_neg=85, control_prob=(0, 0, 1, 0), tokenizer=tok
    )
    assert set(spans) == set(range(12))  # capped at the number of classes, all fit
    for _ in range(20):
        _, spans, _ = build_detection_prompt(
            [3], names, rng, random_sample_neg=85, control_prob=(1, 0, 0, 0), tokenizer=tok
        )
        assert 3 in spans and len(spans) <= 2
    caption, spans, _ = build_detection_prompt(
        [7, 2], names, rng, random_sample_neg=4, control_prob=(0, 1, 0, 0), tokenizer=tok,
        shuffle=False,
    )  # fmt: skip
    assert caption == "name2. name7"
    caption, _, _ = build_detection_prompt(
        [9, 4, 1, 7, 2], names, rng, random_sample_neg=4, control_prob=(0, 1, 0, 0),
        tokenizer=tok, shuffle=False,
    )  # fmt: skip
    assert caption == "name1. name2. name4. name7. name9"
    with pytest.raises(KeyError, match="12"):
        build_detection_prompt(
            [12], names, rng, random_sample_neg=1, control_prob=(0, 1, 0, 0), tokenizer=tok
        )


def test_detection_prompt_budgets(tok):
    """Spec 4.4: the positives are shuffled before the overflow guard keeps them (so which ones
    survive varies), and a negative is kept only while the remaining budget stays above 0."""
    names = [f"name{i}" for i in range(10)]
    length = prompt_token_lengths(tok, names)[0]
    assert set(prompt_token_lengths(tok, names)) == {length}
    rng = random.Random(2)
    kept_sets = set()
    for _ in range(20):
        _, _, kept = build_detection_prompt(
            [0, 1, 2, 3, 4, 5], names, rng, random_sample_neg=0, control_prob=(0, 1, 0, 0),
            max_tokens=2 * length, tokenizer=tok,
        )  # fmt: skip
        assert len(kept) == 2
        kept_sets.add(tuple(kept))
    assert len(kept_sets) > 1
    # one negative of exactly the budget leaves 0: not kept; one token more and it is
    for budget, expected in ((length, 0), (length + 1, 1)):
        _, spans, kept = build_detection_prompt(
            [], names, rng, random_sample_neg=1, control_prob=(0, 0, 1, 0), max_tokens=budget,
            tokenizer=tok,
        )  # fmt: skip
        assert kept == [] and len(spans) == expected


def test_detection_prompt_overflow_counts_the_first_dropped_positive(tok):
    """Spec 4.4 as the original codes it: when the positives overflow, the length that bounds the
    negatives includes the first positive that did not fit, so a negative that would fit in
    what the kept positives leave is not added."""
    names = [" ".join([f"name{i}"] * 4) for i in range(3)] + ["name3"]
    lengths = prompt_token_lengths(tok, names)
    long_, short = lengths[0], lengths[3]
    assert set(lengths[:3]) == {long_} and long_ > short + 1
    budget = 2 * long_ + short + 1  # two positives and the negative fit; three positives do not
    for positives, expected_negative in (([0, 1], True), ([0, 1, 2], False)):
        _, spans, kept = build_detection_prompt(
            positives, names, random.Random(0), random_sample_neg=4, control_prob=(0, 0, 1, 0),
            max_tokens=budget, tokenizer=tok,
        )  # fmt: skip
        # every class is drawn; the positives among them are discarded, name 3 is the negative
        assert len(kept) == 2 and set(spans) - set(kept) <= {3}
        assert (3 in spans) == expected_negative, (positives, spans)


def test_detection_prompt_uniform_negatives_capped_by_the_classes(tok):
    """Spec 4.4 step 2 as the original codes it: with fewer classes than RANDOM_SAMPLE_NEG the
    uniform option draws n from 1..#classes (not 1..85 then capped, which is nearly always all)."""
    names = [f"name{i}" for i in range(12)]
    rng = random.Random(0)
    counts = Counter()
    for _ in range(600):
        _, spans, _ = build_detection_prompt(
            [], names, rng, random_sample_neg=85, control_prob=(0, 0, 0, 1), tokenizer=tok
        )
        counts[len(spans)] += 1
    assert set(counts) == set(range(1, 13))
    assert max(counts.values()) < 600 * 0.2  # each count about 1/12; capped after: 12 in 87 %


def test_mask_tokens_for_mlm(tok):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tok), (64, 40), generator=gen)
    ids[:, 0], ids[:, 30], ids[:, 31:] = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    masked, labels = mask_tokens_for_mlm(ids, tok, 0.15, generator=gen)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, 30:] = True
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    rate = selected.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.03
    masked, labels = mask_tokens_for_mlm(ids, tok, 1.0, generator=gen)
    selected = labels != -100
    assert torch.equal(selected, ~special)
    n = selected.sum().item()
    to_mask = (masked == tok.mask_token_id) & selected
    unchanged = (masked == ids) & selected
    assert abs(to_mask.sum().item() / n - 0.8) < 0.03
    assert abs(unchanged.sum().item() / n - 0.1) < 0.03  # (+ random hits on the same id)


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(OSError, match="cannot load tokenizer"):
        build_tokenizer(str(tmp_path / "missing"))


def test_positive_map_retries_up_to_two_characters_inside_the_span(tok):
    """Spec 3.4: the first token is looked up at begin, begin+1, begin+2 and the last at end-1,
    end-2, end-3, so a span with two spaces before or after its word still maps to the word."""
    caption = "a  red  circle"  # the spaces around "red" map to no token
    enc = tokenize(tok, caption, 16)
    b, e = caption.index("red"), caption.index("red") + len("red")
    assert enc.char_to_token(0, b - 1) is None and enc.char_to_token(0, b - 2) is None
    assert enc.char_to_token(0, e) is None and enc.char_to_token(0, e + 1) is None
    pm = char_spans_to_positive_map(enc, [[[b - 2, e]], [[b, e + 2]], [[b - 2, e + 2]]], 16)
    want = overlap_reference(enc, (b, e))
    assert len(want) == 1
    for r in range(3):
        assert row_tokens(pm[r]) == want, r


class _TinyVocab:
    """The tokenizer interface of mask_tokens_for_mlm: 6 ids, 0-3 special, 3 is <mask>."""

    mask_token_id = 3
    all_special_ids = [0, 1, 2, 3]

    def __len__(self):
        return 6


def test_mlm_random_replacements_are_uniform_over_the_whole_vocabulary():
    """Coarse spec 3.2: 10 % of the selected tokens become a uniformly random id in
    [0, len(tokenizer)), the last id included."""
    ids = torch.full((200, 50), 4)
    gen = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens_for_mlm(ids, _TinyVocab(), 1.0, generator=gen)
    assert (labels == 4).all()
    n = ids.numel()
    counts = torch.bincount(masked.flatten(), minlength=6).double() / n
    # ids 0, 1, 2 and 5 only come from the random replacements: 0.1 / 6 each
    for i in (0, 1, 2, 5):
        assert abs(counts[i].item() - 0.1 / 6) < 0.005, (i, counts[i].item())
    assert abs(counts[3].item() - (0.8 + 0.1 / 6)) < 0.02  # <mask>
    assert abs(counts[4].item() - (0.1 + 0.1 / 6)) < 0.02  # kept, or drawn again


def test_positive_map_span_may_end_at_the_caption_end_but_not_past_it(tok):
    """Half-open spans: ``[b, len(caption))`` is the last word, ``[b, len(caption) + 1)`` is one
    character past the caption and is refused (not silently mapped to the last word)."""
    caption = "a red circle"  # 12 characters, "circle" is [6, 12)
    enc = tokenize(tok, caption, 16)
    pm = char_spans_to_positive_map(enc, [[[6, 12]]], 16)
    assert row_tokens(pm[0]) == {enc.char_to_token(0, 6)}
    with pytest.raises(ValueError, match=r"\[6, 13\) is outside the caption \(length 12\)"):
        char_spans_to_positive_map(enc, [[[6, 13]]], 16)


def test_mlm_never_selects_any_special_token(tok):
    """Coarse spec 3.2: no special token is ever selected, <unk> and <mask> included (not only
    <s>, </s> and <pad>), even at probability 1."""
    specials = [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id]
    specials.append(tok.mask_token_id)
    assert len(set(specials)) == 5
    ids = torch.tensor([specials * 4 + [20, 21]])
    gen = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens_for_mlm(ids, tok, 1.0, generator=gen)
    assert labels[0, :20].eq(-100).all()
    assert torch.equal(masked[0, :20], ids[0, :20])
    assert labels[0, 20:].tolist() == [20, 21]


def test_mlm_special_ids_argument_replaces_the_tokenizer_specials():
    """``special_ids`` given: exactly those ids are never selected; the tokenizer's own special
    ids (here 3, the mask id) become selectable."""
    ids = torch.tensor([[4, 5, 3, 4, 5, 3]])
    masked, labels = mask_tokens_for_mlm(ids, _TinyVocab(), 1.0, special_ids=[4])
    assert labels.tolist() == [[-100, 5, 3, -100, 5, 3]]
    assert masked[0, 0] == 4 and masked[0, 3] == 4
