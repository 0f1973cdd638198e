"""Category-list prompts (fine-grained spec 4.3): the detection prompt of a dataset's categories,
chunked and tokenized with each label's token map, and the original's per-category caption
prompts (``DATASETS.CAPTION_PROMPT``). Shared by the detection mapper and
:class:`fiber_d2.predictor.FIBERPredictor`."""

from __future__ import annotations

import ast
from typing import List, Sequence, Tuple

import torch

from ..config import ConfigError
from ..text import (
    PromptEntry,
    build_prompt,
    char_spans_to_positive_map,
    chunk_names,
    tokenize,
)

__all__ = ["encode_category_prompts", "parse_caption_prompt"]


def parse_caption_prompt(text: str) -> List[Tuple[str, str, str]]:
    """``DATASETS.CAPTION_PROMPT``: the original's format, a list of ``{"prefix": ..., "name":
    ..., "suffix": ...}`` per category in label order, as a Python / JSON literal ("" for none).

    Raises:
        ConfigError: not such a list (one line naming the key and the entry).
    """
    if not text or not text.strip():
        return []
    try:
        entries = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"DATASETS.CAPTION_PROMPT is not a list literal: {e}") from None
    if not isinstance(entries, (list, tuple)):
        raise ConfigError("DATASETS.CAPTION_PROMPT must be a list of {prefix, name, suffix} dicts")
    out = []
    for i, entry in enumerate(entries):
        parts = (
            tuple(entry.get(k) for k in ("prefix", "name", "suffix"))
            if isinstance(entry, dict)
            else ()
        )
        if len(parts) != 3 or not all(isinstance(p, str) for p in parts):
            raise ConfigError(
                f"DATASETS.CAPTION_PROMPT entry {i} ({entry!r}) needs string prefix, name, suffix"
            )
        out.append(parts)
    return out


def encode_category_prompts(
    tokenizer,
    names: Sequence[PromptEntry],
    *,
    max_query_len: int,
    separator: str = ". ",
    chunk_size: int = -1,
    squeeze: bool = False,
) -> dict:
    """Tokenize a category list as K prompt chunks with each label's token map (spec 4.3).

    Shared by the test-time detection mapper and :class:`fiber_d2.predictor.FIBERPredictor`.

    Args:
        tokenizer: a fast tokenizer.
        names: prompt text per label (L names, label order).
        max_query_len: padded token length T.
        separator: joins the names of one prompt.
        chunk_size: names per prompt (:func:`fiber_d2.text.chunk_names`); <= 0: one prompt.
        squeeze: when everything fits one prompt (K = 1), drop the chunk axis: ``caption`` str,
            ``input_ids``/``attention_mask`` (T,), ``label_token_map`` (L, T).

    Returns:
        dict with ``caption`` (list of K str), ``chunks`` (list of K lists of label indices),
        ``input_ids``/``attention_mask`` LongTensor (K, T) and ``label_token_map`` BoolTensor
        (K, L, T) (row l of chunk k is empty unless label l is in chunk k).
    """
    chunks = chunk_names(names, chunk_size, tokenizer, max_query_len, separator)
    prompts = [build_prompt([names[i] for i in c], separator) for c in chunks]
    enc = tokenize(tokenizer, [p[0] for p in prompts], max_query_len)
    label_map = torch.zeros(len(chunks), len(names), max_query_len, dtype=torch.bool)
    for k, (chunk, (_, spans)) in enumerate(zip(chunks, prompts)):
        rows = char_spans_to_positive_map(enc, [[s] for s in spans], max_query_len, batch_index=k)
        label_map[k, chunk] = rows
    out = {
        "caption": [p[0] for p in prompts],
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "label_token_map": label_map,
    }
    if squeeze and len(chunks) == 1:
        out = {k: v[0] for k, v in out.items()}
    return {**out, "chunks": chunks}
