"""Tests of fiber_d2.inference.prompts: prompt keys, phrase spans, name and caption encodings."""

import numpy as np
import pytest
import torch

from fiber_d2.data.prompts import encode_category_prompts
from fiber_d2.data.shapes import build_shapes_tokenizer
from fiber_d2.inference.prompts import (
    encode_caption,
    encode_names,
    phrase_spans,
    prompt_key,
    split_prompt,
)
from fiber_d2.text import char_spans_to_positive_map, tokenize

CAPTION = "a red circle left of a red circle and a blue square"
NAMES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_shapes_tokenizer(tmp_path_factory.mktemp("tok"))


def test_split_prompt_separators():
    assert split_prompt("red circle, blue square,", ", ") == ["red circle", "blue square"]
    assert split_prompt("  red circle  ", "") == ["red circle"]
    with pytest.raises(ValueError, match="no category name"):
        split_prompt("", ". ")


def test_phrase_spans_substrings_spans_and_repeats():
    assert phrase_spans(CAPTION, None) == [[0, len(CAPTION)]]
    b, e = CAPTION.index("and"), CAPTION.index("blue")
    spans = phrase_spans(CAPTION, ["red circle", "red circle", (b, b + 3), np.array([e, e + 4])])
    assert [CAPTION[b:e] for b, e in spans] == ["red circle", "red circle", "and", "blue"]
    assert spans[0] != spans[1]  # a repeated substring takes its next occurrence
    # a phrase is the word where it occurs as one, not the letters inside a longer word before it
    caption = "a concatenated cat near a cat"
    assert phrase_spans(caption, ["cat", "cat"]) == [[15, 18], [26, 29]]
    assert phrase_spans("concatenated", ["cat"]) == [[3, 6]]  # no whole word: the letters


@pytest.mark.parametrize(
    "phrases, needle",
    [
        ([], "non-empty list"),
        ("red circle", "non-empty list"),
        ([" "], "phrase 0 is empty"),
        (["purple star"], "not in the caption"),
        (["red circle"] * 3, "phrase 2 'red circle' is not in the caption"),
        ([(0, 999)], "outside the caption"),
        ([(5, 2)], "outside the caption"),
        ([(1, 2)], "covers only whitespace"),
        ([(1, 2, 3)], "neither a str nor a"),
        ([(1.0, 2.0)], "neither a str nor a"),
    ],
)
def test_phrase_spans_errors(phrases, needle):
    with pytest.raises(ValueError, match=needle):
        phrase_spans(CAPTION, phrases)


def test_prompt_key():
    assert prompt_key(CAPTION, [[2, 12]]) == prompt_key(CAPTION, [(2, 12)])
    assert prompt_key(CAPTION) != prompt_key(CAPTION, ["red circle"])
    assert prompt_key(NAMES) == prompt_key(tuple(NAMES)) != prompt_key(NAMES[:2])
    hash(prompt_key(CAPTION, ["red circle", (2, 12)]))
    with pytest.raises(ValueError, match="only accepted with a caption"):
        prompt_key(NAMES, ["red circle"])
    with pytest.raises(ValueError, match="caption str or a list of names"):
        prompt_key(42)
    with pytest.raises(ValueError, match="neither a str nor a"):
        prompt_key(CAPTION, [3])
    # a batch's prompts given for one image: unhashable lists, a TypeError before
    with pytest.raises(ValueError, match=r"prompt entry 0 is not a name \(str\): \['a'\]"):
        prompt_key([["a"], ["b"]])


def test_encode_caption_matches_text_functions(tok):
    enc = encode_caption(tok, CAPTION, ["blue square", (2, 12)], max_query_len=32)
    ref = tokenize(tok, CAPTION, 32)
    spans = [[[CAPTION.index("blue square"), CAPTION.index("blue square") + 11]], [[2, 12]]]
    assert enc["caption"] == CAPTION and enc["label_names"] == ["blue square", "red circle"]
    assert torch.equal(enc["input_ids"], ref["input_ids"][0])
    assert torch.equal(enc["attention_mask"], ref["attention_mask"][0])
    assert torch.equal(enc["label_token_map"], char_spans_to_positive_map(ref, spans, 32))
    assert enc["label_token_map"].any(dim=1).all()
    with pytest.raises(ValueError, match="caption needs .* tokens, MAX_QUERY_LEN 8"):
        encode_caption(tok, CAPTION, None, max_query_len=8)
    with pytest.raises(ValueError, match="caption has no text"):
        encode_caption(tok, "  ", None, max_query_len=32)


def test_caption_must_fit_with_its_special_tokens(tok):
    """A caption fits when its tokens plus <s> and </s> fit MAX_QUERY_LEN; one token less is
    refused rather than cut (a cut would drop the end of the caption and the phrases there)."""
    full = tok(CAPTION)["input_ids"]  # <s> caption </s>
    enc = encode_caption(tok, CAPTION, ["blue square"], max_query_len=len(full))
    assert enc["input_ids"].tolist() == full and enc["label_token_map"][0, -2]
    with pytest.raises(ValueError, match="caption needs"):
        encode_caption(tok, CAPTION, None, max_query_len=len(full) - 1)


def test_encode_names_one_prompt_and_chunks(tok):
    enc = encode_names(tok, NAMES, max_query_len=32)
    ref = encode_category_prompts(tok, NAMES, max_query_len=32, chunk_size=3, squeeze=True)
    assert enc["caption"] == ref["caption"] == "red circle. blue square. green triangle"
    assert enc["label_names"] == NAMES
    assert torch.equal(enc["label_token_map"], ref["label_token_map"])
    chunked = encode_names(tok, NAMES, max_query_len=32, chunk_size=2)
    assert chunked["caption"] == ["red circle. blue square", "green triangle"]
    assert chunked["label_token_map"].shape == (2, 3, 32)
    # a small token budget chunks by length even without a chunk size
    short = encode_names(tok, NAMES, max_query_len=8)
    assert isinstance(short["caption"], list) and len(short["caption"]) > 1
    assert short["label_token_map"].any(dim=2).sum(dim=0).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="category list has no names"):
        encode_names(tok, [], max_query_len=32)
    with pytest.raises(ValueError, match="empty prompt entry 1"):
        encode_names(tok, ["red circle", " "], max_query_len=32)


def test_phrase_spans_whole_word_on_both_sides():
    """A substring phrase skips occurrences that end a longer word ("bobcat") as well as those
    that start one ("catalog") and takes the whole word."""
    assert phrase_spans("a bobcat and a cat", ["cat"]) == [[15, 18]]
    assert phrase_spans("a catalog and a cat", ["cat"]) == [[16, 19]]


def test_phrase_spans_regex_characters_are_literal():
    """A phrase is matched as plain text: "." is not any character, "+" is not a repetition."""
    assert phrase_spans("a 3x5 card and a 3.5 disk", ["3.5"]) == [[17, 20]]
    assert phrase_spans("a c++ book", ["c++"]) == [[2, 5]]


def test_phrase_spans_repeated_phrase_takes_the_next_non_overlapping_occurrence():
    """The second "red red" starts after the end of the first, not inside it."""
    assert phrase_spans("red red red red", ["red red", "red red"]) == [[0, 7], [8, 15]]


def test_phrase_spans_span_bounds():
    """A ``[start, end)`` span may end at the caption's end, not one past it, and not start
    before 0."""
    n = len(CAPTION)  # the caption ends with "square"
    assert phrase_spans(CAPTION, [(n - 6, n)]) == [[n - 6, n]]
    for bad in [(n - 6, n + 1), (-1, 3)]:
        with pytest.raises(ValueError, match="outside the caption"):
            phrase_spans(CAPTION, [bad])


def test_encode_names_custom_separator(tok):
    """The separator joins the names and each label maps to its own name's tokens only."""
    enc = encode_names(tok, NAMES, max_query_len=16, separator=" and ")
    assert enc["caption"] == "red circle and blue square and green triangle"
    words = ["re", "d", "Ġcircle", "Ġand", "Ġblue", "Ġsquare", "Ġand", "Ġgreen", "Ġtriangle"]
    assert tok.tokenize(enc["caption"]) == words  # token t + 1 is word t (after <s>)
    rows = [set(torch.nonzero(r).flatten().tolist()) for r in enc["label_token_map"]]
    assert rows == [{1, 2, 3}, {5, 6}, {8, 9}]


def test_encode_names_chunks_by_the_custom_separator_length(tok):
    """The token budget counts the separator actually used: the three names fit 10 tokens joined
    by ". " but not joined by " and a ", so they are split rather than the last name cut off."""
    assert len(tok.tokenize("red circle. blue square. green triangle")) <= 10
    assert len(tok.tokenize("red circle and a blue square and a green triangle")) == 11
    enc = encode_names(tok, NAMES, max_query_len=12, separator=" and a ")
    assert enc["caption"] == ["red circle and a blue square", "green triangle"]
    assert enc["label_token_map"].any(dim=2).sum(dim=0).tolist() == [1, 1, 1]
