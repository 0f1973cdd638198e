"""CIDEr-D rewards with document frequencies of the training captions (coarse spec §5.6).

The original reads its n-gram document frequencies from ``coco-train-words.p``, which is not
released. They are rebuilt here from the training set itself, the way CIDEr-D defines them: every
training *image* is one document made of all its reference captions (after the normalisation
below); an n-gram's document frequency is the number of images whose references contain it
(n = 1..4), and the reference length term is log(number of training images).

Scoring is pycocoevalcap's ``CiderScorer`` (CIDEr-D: clipped n-gram counts, Gaussian length
penalty with sigma 6, x10) with those fixed frequencies instead of ones counted over the scored
batch. Normalisation of candidates and references (original ``_wrap_sentence``): strip, drop one
trailing ".", append " <eos>".
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs

__all__ = ["CiderD", "build_document_frequency", "normalise_caption", "references_by_image"]

logger = logging.getLogger(__name__)


def normalise_caption(text: str) -> str:
    """Strip, drop one trailing ".", append " <eos>" (the original's CIDEr-D text form)."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    return text + " <eos>"


def references_by_image(records: Iterable[dict]) -> dict:
    """Captions of every image, keyed by (dataset name, image id), from caption records.

    Args:
        records: one record per caption (``caption``) or per image (``captions``).

    Returns:
        {(dataset_name, image_id): [caption, ...]} with duplicates removed, order kept.
    """
    refs: dict = defaultdict(list)
    for r in records:
        key = (r.get("dataset_name"), r["image_id"])
        texts = r.get("captions", r.get("caption"))
        for t in [texts] if isinstance(texts, str) else list(texts or []):
            if isinstance(t, str) and t.strip() and t not in refs[key]:
                refs[key].append(t)
    return dict(refs)


def build_document_frequency(
    references: Mapping[object, Sequence[str]],
) -> tuple[dict[tuple[str, ...], float], float]:
    """Document frequencies of the n-grams (n = 1..4) of the training references.

    Args:
        references: {image: [caption, ...]} (raw captions; normalised here).

    Returns:
        ({n-gram: number of images whose references contain it}, log(number of images)).
    """
    df: dict[tuple[str, ...], float] = defaultdict(float)
    images = 0
    for captions in references.values():
        if not captions:
            continue
        images += 1
        cooked = cook_refs([normalise_caption(c) for c in captions])
        for ngram in {g for ref in cooked for g in ref}:
            df[ngram] += 1.0
    if images == 0:
        raise ValueError("CIDEr-D document frequencies: no training image has a caption")
    logger.info("CIDEr-D document frequencies: %d n-grams over %d images", len(df), images)
    return dict(df), math.log(float(images))


class _FixedFrequencyScorer(CiderScorer):
    """pycocoevalcap's CIDEr-D with given document frequencies and reference length."""

    def __init__(self, df: Mapping, log_images: float, n: int = 4, sigma: float = 6.0):
        super().__init__(n=n, sigma=sigma)
        self.document_frequency = defaultdict(float, df)
        self._log_images = log_images

    # compute_cider assigns ref_len = log(number of scored images); keep the training value
    @property
    def ref_len(self):
        return self._log_images

    @ref_len.setter
    def ref_len(self, value):
        pass

    def compute_doc_freq(self):
        """Frequencies are fixed (training set); nothing is counted over the scored batch."""


class CiderD:
    """Per-caption CIDEr-D against references, with training-set document frequencies.

    Args:
        df: n-gram document frequencies (:func:`build_document_frequency`).
        log_images: log of the number of training images.
    """

    def __init__(self, df: Mapping, log_images: float):
        self.df = dict(df)
        self.log_images = float(log_images)

    @classmethod
    def from_references(cls, references: Mapping[object, Sequence[str]]) -> CiderD:
        """Build from {image: [caption, ...]} of the training set."""
        return cls(*build_document_frequency(references))

    def scores(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its references.

        Args:
            candidates: N captions.
            references: N lists of reference captions (each non-empty).

        Returns:
            (N,) float array.
        """
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
        scorer = _FixedFrequencyScorer(self.df, self.log_images)
        for i, (cand, refs) in enumerate(zip(candidates, references)):
            if not refs:
                raise ValueError(f"CIDEr-D: candidate {i} ({cand!r}) has no reference caption")
            scorer += (normalise_caption(cand), [normalise_caption(r) for r in refs])
        return np.asarray(scorer.compute_cider(), dtype=np.float64)
