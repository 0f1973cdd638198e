"""The prompt forms a predictor accepts, turned into the model's text inputs.

A prompt is either a list of category names (one detection prompt, the names joined by
``DATASETS.SEPARATION_TOKENS``, spec 4.3; label l is name l; chunked when it does not fit one
prompt) or a caption str with optional phrases (``[start, end)`` char spans or substrings of the
caption; label p is phrase p; without phrases the whole caption is the only label). Used by
:class:`fiber_d2.predictor.FIBERPredictor` and the exported runners, which share its ``encode``.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..data.prompts import encode_category_prompts
from ..text import char_spans_to_positive_map, tokenize

__all__ = ["split_prompt", "prompt_key", "phrase_spans", "encode_names", "encode_caption"]

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[str]]
Phrase = Union[str, Sequence[int]]


def split_prompt(text: str, separator: str = ". ") -> List[str]:
    """Split a detection prompt such as ``"red circle. blue square."`` into category names.

    Args:
        text: names joined by ``separator``; surrounding whitespace, a trailing separator and
            empty entries are ignored.
        separator: the prompt separator (``DATASETS.SEPARATION_TOKENS``).

    Returns:
        the list of names.

    Raises:
        ValueError: no name in ``text``.
    """
    names = [n.strip() for n in text.split(separator)] if separator else [text.strip()]
    tail = separator.strip()
    if names and tail and names[-1].endswith(tail):
        names[-1] = names[-1][: -len(tail)].strip()
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"prompt {text!r} contains no category name")
    return names


def prompt_key(prompt: Prompt, phrases: Optional[Sequence[Phrase]] = None) -> tuple:
    """A hashable key of one prompt (a predictor caches its encodings under it).

    Args:
        prompt: a list of category names, or a caption str.
        phrases: caption only: its phrases (see :func:`phrase_spans`), or None.

    Returns:
        ``("caption", caption, phrases as a tuple or None)`` or ``("names", tuple of names)``.

    Raises:
        ValueError: phrases with a name list, a prompt of another type, a phrase that is neither
            a str nor a sequence.
    """
    if isinstance(prompt, str):
        return ("caption", prompt, None if phrases is None else tuple(map(_phrase_key, phrases)))
    if isinstance(prompt, Sequence):
        if phrases is not None:
            raise ValueError("phrases are only accepted with a caption str, not a name list")
        for i, name in enumerate(prompt):
            _check_is_name(i, name)
        return ("names", tuple(prompt))
    raise ValueError(f"prompt must be a caption str or a list of names, got {prompt!r}")


def _check_is_name(i: int, name) -> None:
    """A ValueError when entry ``i`` of a name list is not a str (e.g. a batch's prompts given for
    one image: a list of lists)."""
    if not isinstance(name, str):
        raise ValueError(
            f"prompt entry {i} is not a name (str): {name!r:.60}; one image takes a caption str "
            "or a list of names (a batch: one such prompt per image)"
        )


def _phrase_key(phrase) -> Union[str, tuple]:
    if isinstance(phrase, str):
        return phrase
    try:
        return tuple(phrase)
    except TypeError:
        raise ValueError(f"phrase {phrase!r} is neither a str nor a (start, end) pair") from None


def _find_phrase(caption: str, phrase: str, start: int) -> int:
    """The first occurrence of ``phrase`` in ``caption`` from ``start`` that is not part of a longer
    word ("cat" in "a concatenated cat" is the last word), else the first occurrence at all; -1."""
    whole = re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", caption[start:])
    return start + whole.start() if whole else caption.find(phrase, start)


def phrase_spans(caption: str, phrases: Optional[Sequence[Phrase]]) -> List[List[int]]:
    """The ``[start, end)`` char span of every phrase of a caption.

    Args:
        caption: the caption.
        phrases: ``[start, end)`` char spans or substrings of the caption, one per label (a
            substring is found as a whole word where it occurs as one; a repeated substring takes
            its next occurrence); None: the whole caption.

    Returns:
        list of ``[start, end]`` pairs, one per phrase (one for None).

    Raises:
        ValueError: an empty phrase list or phrase, a substring not in the caption, a span
            outside the caption or covering only whitespace.
    """
    if phrases is None:
        return [[0, len(caption)]]
    if isinstance(phrases, str) or len(phrases) == 0:
        raise ValueError(
            f"phrases must be a non-empty list of spans or substrings, got {phrases!r} "
            "(pass None to ground the whole caption)"
        )
    spans: List[List[int]] = []
    next_start: Dict[str, int] = {}
    for i, phrase in enumerate(phrases):
        if isinstance(phrase, str):
            if not phrase.strip():
                raise ValueError(f"phrase {i} is empty")
            start = _find_phrase(caption, phrase, next_start.get(phrase, 0))
            if start < 0:
                raise ValueError(f"phrase {i} {phrase!r} is not in the caption {caption!r}")
            next_start[phrase] = start + len(phrase)  # a repeated phrase takes the next match
            spans.append([start, start + len(phrase)])
            continue
        if len(phrase) != 2 or not all(isinstance(v, (int, np.integer)) for v in phrase):
            raise ValueError(f"phrase {i} {phrase!r} is neither a str nor a (start, end) pair")
        start, end = int(phrase[0]), int(phrase[1])
        if not 0 <= start < end <= len(caption):
            raise ValueError(
                f"phrase {i} span [{start}, {end}) is outside the caption (length {len(caption)})"
            )
        if not caption[start:end].strip():
            raise ValueError(f"phrase {i} span [{start}, {end}) covers only whitespace")
        spans.append([start, end])
    return spans


def encode_names(
    tokenizer,
    names: List[str],
    *,
    max_query_len: int,
    separator: str = ". ",
    chunk_size: int = -1,
) -> dict:
    """Text inputs of a category-name prompt (:func:`fiber_d2.data.prompts.encode_category_prompts`).

    Args:
        tokenizer: a fast tokenizer.
        names: L category names, label order.
        max_query_len: padded token length T.
        separator: joins the names of one prompt.
        chunk_size: names per prompt chunk (``TEST.CHUNKED_EVALUATION``); <= 0: as many as fit
            in ``max_query_len`` tokens.

    Returns:
        dict with ``caption`` (str, or list of K str when chunked), ``label_names`` (L str),
        ``input_ids``/``attention_mask`` LongTensor (T,) or (K, T), ``label_token_map``
        BoolTensor (L, T) or (K, L, T).

    Raises:
        ValueError: no names, an empty name, a name that fits no prompt.
    """
    if not names:
        raise ValueError("empty prompt: the category list has no names")
    for i, name in enumerate(names):
        _check_is_name(i, name)
        if not name.strip():
            raise ValueError(f"empty prompt entry {i}: {name!r}")
    # Budget-driven chunking when TEST.CHUNKED_EVALUATION is off: one prompt if it fits.
    chunk_size = chunk_size if chunk_size > 0 else len(names)
    enc = encode_category_prompts(
        tokenizer,
        names,
        max_query_len=max_query_len,
        separator=separator,
        chunk_size=chunk_size,
        squeeze=True,
    )
    chunks = enc.pop("chunks")
    if len(chunks) > 1:
        logger.info("%d names split into %d prompt chunks", len(names), len(chunks))
    return {**enc, "label_names": list(names)}


def encode_caption(
    tokenizer, caption: str, phrases: Optional[Sequence[Phrase]], *, max_query_len: int
) -> dict:
    """Text inputs of a caption prompt whose labels are its phrases (:func:`phrase_spans`).

    Args:
        tokenizer: a fast tokenizer.
        caption: the caption.
        phrases: L phrases (spans or substrings), or None (the whole caption, L = 1).
        max_query_len: padded token length T.

    Returns:
        dict with ``caption`` (str), ``label_names`` (L str, the phrases' text),
        ``input_ids``/``attention_mask`` LongTensor (T,), ``label_token_map`` BoolTensor (L, T).

    Raises:
        ValueError: an empty caption, a bad phrase, a caption longer than ``max_query_len``
            tokens.
    """
    if not caption.strip():
        raise ValueError("empty prompt: the caption has no text")
    spans = phrase_spans(caption, phrases)
    needed = len(tokenizer.tokenize(caption))
    if needed > max_query_len - 2:
        raise ValueError(
            f"caption needs {needed} tokens, MAX_QUERY_LEN {max_query_len} holds "
            f"{max_query_len - 2}; shorten it or pass a list of names (chunked)"
        )
    enc = tokenize(tokenizer, caption, max_query_len)
    label_map = char_spans_to_positive_map(enc, [[s] for s in spans], max_query_len)
    return {
        "caption": caption,
        "label_names": [caption[b:e] for b, e in spans],
        "input_ids": enc["input_ids"][0],
        "attention_mask": enc["attention_mask"][0],
        "label_token_map": label_map,
    }
