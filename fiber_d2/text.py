"""Text handling shared by the data mappers, the predictor and the evaluators.

Everything that turns category names or captions into model inputs lives here: tokenizer
construction (a hub name, a local RoBERTa tokenizer directory, or the built-in shapes
tokenizer), prompt building from category names, padded tokenization with character offsets,
character spans -> token positive maps, prompt chunking for large vocabularies (LVIS), the
detection-prompt sampling used to train on object-detection data, and MLM masking.

Conventions (FIBER fine-grained spec, sections 3.4 and 4): captions are tokenized padded to
exactly ``max_length`` tokens (256) and truncated beyond; the models then cut each batch down to
:func:`padded_text_length` (the one place that decides a batch's text length); category names are joined by ``". "``
without a trailing separator; char spans are half-open ``[start, end)`` pairs, as MDETR's
``tokens_positive``.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "PromptEntry",
    "prompt_text",
    "SHAPES_TOKENIZER",
    "build_tokenizer",
    "clean_name",
    "build_prompt",
    "tokenize",
    "char_spans_to_positive_map",
    "chunk_names",
    "prompt_token_lengths",
    "sample_num_negatives",
    "build_detection_prompt",
    "mask_tokens_for_mlm",
    "TEXT_LENGTH_MULTIPLE",
    "padded_text_length",
    "trim_text",
]

logger = logging.getLogger(__name__)

SHAPES_TOKENIZER = "builtin:shapes"
"""Special tokenizer name: the byte-level BPE tokenizer of the built-in shapes world."""

Span = Sequence[int]


@functools.lru_cache(maxsize=8)
def build_tokenizer(name_or_path: str):
    """Build (once per process and name) a fast RoBERTa-style tokenizer.

    Args:
        name_or_path: a hub name (``"roberta-base"``), a local directory written by
            ``save_pretrained``, or ``"builtin:shapes"`` for the shapes-world tokenizer, which
            is trained and cached under the shapes root on first use (no network needed).

    Returns:
        a ``transformers`` fast tokenizer (offsets and ``char_to_token`` available). The same
        object is returned for repeated calls with the same name: treat it as read-only.
    """
    if name_or_path == SHAPES_TOKENIZER:
        from .data.shapes import ensure_shapes_tokenizer  # local import: data imports text

        name_or_path = str(ensure_shapes_tokenizer())
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise OSError(
            f"cannot load tokenizer {name_or_path!r} ({e}); without network use a local "
            f"tokenizer directory or {SHAPES_TOKENIZER!r}"
        ) from e
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_path!r} is not a fast tokenizer (offsets needed)")
    return tokenizer


def clean_name(name: str) -> str:
    """Clean a dataset category name for use in a prompt (spec 4.3).

    Removes a ``"(...)"`` span, replaces ``"_"`` by a space and collapses one level of double
    spaces; a trailing space is kept, e.g. ``"bow_(decorative_ribbons)"`` -> ``"bow "``.

    Args:
        name: raw category name.

    Returns:
        the cleaned name.
    """
    # Greedy match: from the first "(" to the last ")", as the original prompt builder did
    # (LVIS names carry at most one parenthesised qualifier, so greedy vs. lazy never differs).
    name = re.sub(r"\(.*\)", "", name)
    name = name.replace("_", " ")
    return name.replace("  ", " ")


PromptEntry = Union[str, Tuple[str, str, str]]
"""A category's prompt text: its name, or ``(prefix, name, suffix)`` (``DATASETS.CAPTION_PROMPT``)
of which only the name is the category's span."""


def prompt_text(entry: PromptEntry) -> str:
    """The whole text an entry adds to a prompt."""
    return entry if isinstance(entry, str) else "".join(entry)


def build_prompt(
    names: Sequence[PromptEntry], separator: str = ". "
) -> Tuple[str, List[List[int]]]:
    """Join names into a caption and record each name's character span.

    Args:
        names: prompt entry per category (already cleaned): a name, or ``(prefix, name, suffix)``,
            whose span covers the name only (the original's caption prompts).
        separator: text placed between consecutive entries (no trailing separator).

    Returns:
        ``(caption, spans)`` where ``spans[i] = [start, end)`` locates the name of ``names[i]``.
    """
    parts: List[str] = []
    spans: List[List[int]] = []
    pos = 0
    for i, entry in enumerate(names):
        prefix, name, suffix = ("", entry, "") if isinstance(entry, str) else entry
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"prompt entry {i} ({entry!r}) is empty: it would tokenize to nothing")
        if i > 0:
            parts.append(separator)
            pos += len(separator)
        parts.append(prefix + name + suffix)
        spans.append([pos + len(prefix), pos + len(prefix) + len(name)])
        pos += len(prefix) + len(name) + len(suffix)
    return "".join(parts), spans


def tokenize(tokenizer, texts: Union[str, Sequence[str]], max_length: int):
    """Tokenize texts padded to exactly ``max_length`` tokens, with character offsets.

    Args:
        tokenizer: a fast tokenizer (see :func:`build_tokenizer`).
        texts: one text or N texts.
        max_length: the padded length T (specials included); longer texts are truncated and a
            warning is logged.

    Returns:
        a ``BatchEncoding`` with ``input_ids`` and ``attention_mask`` LongTensors (N, T) and
        ``offset_mapping`` (N, T, 2); N = 1 for a single text. ``char_to_token(i, c)`` works.
        The texts are kept as the attribute ``texts`` (list of N str).
    """
    batch = [texts] if isinstance(texts, str) else list(texts)
    if not batch:
        raise ValueError("tokenize needs at least one text")
    encoding = tokenizer(
        batch,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    for i, enc in enumerate(encoding.encodings):
        if enc.overflowing:
            logger.warning("text truncated to %d tokens: %.80r", max_length, batch[i])
    encoding.texts = batch
    return encoding


def _first_token(encoding, batch_index: int, chars: Sequence[int]) -> Optional[int]:
    for c in chars:
        tok = encoding.char_to_token(batch_index, c)
        if tok is not None:
            return tok
    return None


def char_spans_to_positive_map(
    encoding,
    spans_per_row: Sequence[Sequence[Span]],
    max_length: int,
    *,
    batch_index: int = 0,
    text: Optional[str] = None,
) -> torch.Tensor:
    """Map character spans to the tokens they cover (spec 3.4).

    For each span ``[b, e)``: the first token is ``char_to_token(b)``, retried at ``b+1`` then
    ``b+2``; the last token is ``char_to_token(e-1)``, retried at ``e-2`` then ``e-3``; all
    tokens in between are set. A span whose first or last token is still missing (whitespace
    only, or cut off by truncation) is skipped. Retries stay inside the span, so a span never
    borrows a neighbouring word's token.

    Args:
        encoding: output of :func:`tokenize`.
        spans_per_row: R rows, each a list of ``[start, end)`` char spans (one phrase/label).
        max_length: T; must equal the encoding's padded length.
        batch_index: which text of the encoding the spans refer to.
        text: the text (defaults to ``encoding.texts[batch_index]`` when available), used to
            reject spans outside it.

    Returns:
        BoolTensor (R, T), row r marks the tokens of ``spans_per_row[r]``.
    """
    length = encoding["input_ids"].shape[-1]
    if length != max_length:
        raise ValueError(f"encoding has {length} tokens per text, expected max_length={max_length}")
    if text is None and getattr(encoding, "texts", None) is not None:
        text = encoding.texts[batch_index]
    positive = torch.zeros(len(spans_per_row), max_length, dtype=torch.bool)
    for r, spans in enumerate(spans_per_row):
        for span in spans:
            if len(span) != 2:
                raise ValueError(f"row {r}: span {span!r} is not a [start, end) pair")
            b, e = int(span[0]), int(span[1])
            if b < 0 or e <= b or (text is not None and e > len(text)):
                size = "?" if text is None else len(text)
                raise ValueError(f"row {r}: span [{b}, {e}) is outside the caption (length {size})")
            first = _first_token(encoding, batch_index, [c for c in (b, b + 1, b + 2) if c < e])
            last = _first_token(encoding, batch_index, [c for c in (e - 1, e - 2, e - 3) if c >= b])
            if first is None or last is None or last < first:
                logger.debug("row %d: span [%d, %d) maps to no token; skipped", r, b, e)
                continue
            positive[r, first : last + 1] = True
    return positive


def prompt_token_lengths(tokenizer, names: Sequence[str], separator: str = ". ") -> List[int]:
    """BPE length (no specials) of ``name + separator`` for each name, the prompt budget unit.

    Args:
        tokenizer: a fast tokenizer.
        names: prompt text per category.
        separator: the prompt separator.

    Returns:
        list of ints, one per name.
    """
    lengths = []
    for i, entry in enumerate(names):
        name = prompt_text(entry)
        if not name.strip() or not tokenizer.tokenize(name):
            raise ValueError(f"category {i} ({name!r}) tokenizes to nothing")
        lengths.append(len(tokenizer.tokenize(name + separator)))
    return lengths


def chunk_names(
    names: Sequence[str],
    chunk_size: int,
    tokenizer,
    max_length: int,
    separator: str = ". ",
) -> List[List[int]]:
    """Split a long category list into prompts of at most ``chunk_size`` names (LVIS: 40).

    Names are taken in order; a chunk is also closed early when the next name would push the
    prompt past ``max_length - 2`` tokens (the two specials), so no category is ever cut off.

    Args:
        names: prompt text per label, in label order.
        chunk_size: names per chunk; <= 0 puts everything in one chunk (no budget check).
        tokenizer: a fast tokenizer.
        max_length: padded token length T.
        separator: prompt separator.

    Returns:
        list of chunks, each a list of label indices (consecutive, covering all names).
    """
    if chunk_size <= 0:
        return [list(range(len(names)))]
    budget = max_length - 2
    chunks: List[List[int]] = []
    current: List[int] = []
    for i, name in enumerate(names):
        text = prompt_text(name)
        alone = len(tokenizer.tokenize(text)) if text.strip() else 0
        if alone == 0:
            raise ValueError(f"category {i} ({name!r}) tokenizes to nothing")
        if alone > budget:
            raise ValueError(
                f"category {i} ({name!r}) needs {alone} tokens; a prompt holds {budget} "
                f"(max_length {max_length})"
            )
        candidate = current + [i]
        caption, _ = build_prompt([names[j] for j in candidate], separator)
        if current and (len(candidate) > chunk_size or len(tokenizer.tokenize(caption)) > budget):
            chunks.append(current)
            candidate = [i]
        current = candidate
    if current:
        chunks.append(current)
    return chunks


def sample_num_negatives(
    rng: random.Random, control_prob: Sequence[float], random_sample_neg: int
) -> int:
    """Draw how many negative categories to sample (spec 4.4, step 2).

    One uniform draw u: ``u < p1`` -> 1; ``u < p1+p2`` -> 0; ``u < p1+p2+p3`` ->
    ``random_sample_neg``; otherwise uniform in ``{1, ..., random_sample_neg}``.

    Args:
        rng: random source (``random.Random`` or the ``random`` module).
        control_prob: ``(p1, p2, p3, p4)``.
        random_sample_neg: the "full" number of negatives (85).

    Returns:
        the number of classes to draw.
    """
    if len(control_prob) != 4:
        raise ValueError(f"CONTROL_PROB needs 4 values, got {tuple(control_prob)}")
    p1, p2, p3, _p4 = (float(p) for p in control_prob)
    # UNDETERMINED in the spec (4.4): the original asserts p4 == 0 while its pretrain configs
    # set p4 = 0.2. We do not assert: the remaining probability mass (p4 and anything left
    # over) draws the count uniformly from 1..RANDOM_SAMPLE_NEG, which is what the option
    # computes when the assert is ignored. Positives are never dropped.
    u = rng.random()
    if u < p1:
        return 1
    if u < p1 + p2:
        return 0
    if u < p1 + p2 + p3:
        return random_sample_neg
    return rng.randint(1, random_sample_neg) if random_sample_neg >= 1 else 0


def build_detection_prompt(
    positive_ids: Sequence[int],
    all_names: Sequence[str],
    rng: random.Random,
    *,
    random_sample_neg: int,
    control_prob: Sequence[float],
    max_tokens: int = 254,
    shuffle: bool = True,
    tokenizer=None,
    separator: str = ". ",
    name_token_lengths: Optional[Sequence[int]] = None,
) -> Tuple[str, Dict[int, List[int]], List[int]]:
    """Turn one detection sample into a grounding prompt ("optimized for OD", spec 4.4).

    1. Positive-overflow guard: the distinct positive labels are shuffled and kept while the
       running BPE length of ``"<name>. "`` stays <= ``max_tokens``. That running length, the
       first label that did not fit included, is L_pos.
    2. The number of negatives n comes from ``control_prob`` (:func:`sample_num_negatives`),
       with ``random_sample_neg`` capped by the number of classes.
    3. n classes are drawn without replacement from all classes; positives are discarded.
    4. Negatives are kept in order while the remaining budget (``max_tokens`` - L_pos minus
       each negative's length) stays > 0.
    5. Negatives + kept positives are shuffled together (sorted by id if ``shuffle`` is False)
       and joined with ``separator``.

    Args:
        positive_ids: contiguous category ids of the sample's boxes (repeats allowed).
        all_names: prompt text per contiguous category id.
        rng: random source (``random.Random`` or the ``random`` module).
        random_sample_neg: number of negatives of the "full" option (85).
        control_prob: ``(p1, p2, p3, p4)`` control probabilities.
        max_tokens: token budget of the prompt without the two specials (254).
        shuffle: shuffle the final category order.
        tokenizer: fast tokenizer; needed unless ``name_token_lengths`` is given.
        separator: prompt separator.
        name_token_lengths: precomputed :func:`prompt_token_lengths` of ``all_names``.

    Returns:
        ``(caption, spans, kept_positive_ids)``: spans maps each category id in the caption to
        its ``[start, end)`` char span; kept_positive_ids (sorted) are the positives present.
    """
    num_classes = len(all_names)
    positives = sorted(set(int(c) for c in positive_ids))
    for c in positives:
        if not 0 <= c < num_classes:
            raise KeyError(f"positive category id {c} outside [0, {num_classes})")
    if name_token_lengths is None:
        if tokenizer is None:
            raise ValueError("build_detection_prompt needs a tokenizer or name_token_lengths")
        cache: Dict[int, int] = {}

        def length_of(c: int) -> int:
            if c not in cache:
                cache[c] = prompt_token_lengths(tokenizer, [all_names[c]], separator)[0]
            return cache[c]

    else:
        if len(name_token_lengths) != num_classes:
            raise ValueError(
                f"name_token_lengths has {len(name_token_lengths)} entries for {num_classes} names"
            )

        def length_of(c: int) -> int:
            return name_token_lengths[c]

    rng.shuffle(positives)
    kept: List[int] = []
    used = 0
    for c in positives:
        # The original adds a label's length before testing it, so when the positives
        # overflow, the length that bounds the negatives below counts the first label
        # that did not fit too (spec 4.4 calls L_pos "the kept length"; this is the code's).
        used += length_of(c)
        if used > max_tokens:
            break
        kept.append(c)

    # the original caps the "full" count by the number of classes before its options draw from
    # it, so the uniform option reads 1..min(random_sample_neg, num_classes)
    n = sample_num_negatives(rng, control_prob, min(random_sample_neg, num_classes))
    positive_set = set(positives)
    negatives = [c for c in rng.sample(range(num_classes), n) if c not in positive_set]
    budget = max_tokens - used
    kept_neg: List[int] = []
    for c in negatives:
        if budget - length_of(c) <= 0:
            break
        kept_neg.append(c)
        budget -= length_of(c)

    labels = kept_neg + kept
    if shuffle:
        rng.shuffle(labels)
    else:
        labels.sort()
    if not labels:
        return "", {}, []
    caption, spans = build_prompt([all_names[c] for c in labels], separator)
    return caption, dict(zip(labels, spans)), sorted(kept)


def mask_tokens_for_mlm(
    input_ids: torch.Tensor,
    tokenizer,
    probability: float = 0.15,
    generator: Optional[torch.Generator] = None,
    special_ids: Optional[Sequence[int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT-style MLM masking (coarse spec 3.2): 15 % of tokens, 80/10/10.

    Special tokens and padding are never selected. Of the selected tokens 80 % become
    ``<mask>``, 10 % a uniformly random token id in ``[0, len(tokenizer))`` and 10 % stay.

    Args:
        input_ids: LongTensor (..., T).
        tokenizer: tokenizer providing ``mask_token_id``, ``all_special_ids`` and ``len()``.
        probability: selection probability.
        generator: optional torch generator for reproducibility.
        special_ids: ids never selected (default: ``tokenizer.all_special_ids``).

    Returns:
        ``(masked_ids, labels)`` LongTensors shaped like input_ids; labels hold the original id
        at selected positions and -100 elsewhere.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError("tokenizer has no mask token; MLM needs one")
    specials = torch.tensor(
        list(tokenizer.all_special_ids if special_ids is None else special_ids), dtype=torch.long
    )
    maskable = ~torch.isin(input_ids, specials)
    probs = torch.full(input_ids.shape, float(probability)) * maskable
    selected = torch.bernoulli(probs, generator=generator).bool()
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (u < 0.8)
    to_random = selected & (u >= 0.8) & (u < 0.9)
    masked = input_ids.clone()
    masked[to_mask] = tokenizer.mask_token_id
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator)
    masked[to_random] = random_ids[to_random]
    return masked, labels


TEXT_LENGTH_MULTIPLE = 8
"""A batch's text is padded to its longest prompt rounded up to a multiple of this."""


def padded_text_length(attention_mask: torch.Tensor, pad_to_max: bool = False) -> int:
    """The text length T' a batch runs at: the one decision of how far text is padded.

    Tokenization pads every text to ``MAX_QUERY_LEN`` (T); the models cut a batch down to its
    longest prompt rounded up to :data:`TEXT_LENGTH_MULTIPLE` (never beyond T). Every later step
    masks the padding (both cross-attentions, the token logits, the losses, MLM labels), so the
    outputs on the real tokens do not depend on T'. ``pad_to_max`` (``INPUT.PAD_TO_MAX_QUERY_LEN``)
    keeps T, as the original does.

    Args:
        attention_mask: (..., T) 1 for real tokens, 0 for padding (right-padded).
        pad_to_max: keep the full length T.

    Returns:
        T' with ``last real position < T' <= T``.
    """
    full = attention_mask.shape[-1]
    if pad_to_max or attention_mask.numel() == 0:
        return full
    real = (attention_mask.reshape(-1, full) > 0).any(dim=0).nonzero()
    longest = int(real.max()) + 1 if real.numel() else 1
    multiple = TEXT_LENGTH_MULTIPLE
    return min(full, -(-longest // multiple) * multiple)


def trim_text(length: int, *tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """Cut token-indexed tensors (``input_ids``, masks, positive / label maps, MLM labels) to
    ``length`` along their last dimension; None passes through.

    Args:
        length: T' from :func:`padded_text_length`.
        tensors: each (..., T) with T >= length.

    Returns:
        the tensors as views (..., T').
    """
    return tuple(None if t is None else t[..., :length] for t in tensors)
