"""Synthetic inputs of ``tools/benchmark.py`` that follow the mappers' output contract.

Detector (``fiber_d2/data/mapper.py``): uint8 ``image`` (3, H, W); ``input_ids`` /
``attention_mask`` (T = ``MAX_QUERY_LEN``) holding a prompt of ``DYHEAD.NUM_CLASSES - 1`` labels
(two tokens and a separator each, as many as fit); ``label_token_map`` (L, T); for training
``instances`` with random ``gt_boxes``, ``gt_classes``, ``gt_positive_map`` (G, T). Coarse
(``fiber_d2/data/caption_mapper.py``): uint8 ``image`` (3, S, S), S = ``INPUT.IMAGE_SIZE``; a
caption filling 3/4 of T; ``mlm_input_ids`` / ``mlm_labels`` from ``mask_tokens_for_mlm``.
"""

from __future__ import annotations

import argparse
import math

import torch
from detectron2.config import CfgNode
from detectron2.structures import Boxes, Instances

from fiber_d2.engine.setup import tool_image_size
from fiber_d2.engine.trainer import is_coarse_stage
from fiber_d2.text import mask_tokens_for_mlm

__all__ = [
    "BOS_ID",
    "FIRST_WORD_ID",
    "REFERENCE_OVERRIDES",
    "chunked_prompts",
    "coarse_batch",
    "detector_batch",
    "detector_prompt",
    "input_size",
    "model_inputs",
    "padded",
    "reference_cfg",
]

# --reference: the performance features switched off (each gives the same outputs on its own)
REFERENCE_OVERRIDES = {
    "INPUT.PAD_TO_MAX_QUERY_LEN": True,
    "MODEL.DYHEAD.DFCONV_RECOMPUTE": False,
    "MODEL.LANGUAGE_BACKBONE.CHECKPOINT_CROSS_ATTENTION": False,
    "MODEL.SWIN.FUSED_ATTENTION": False,
    "TEST.PREFIX_REUSE": False,
}

_EVAL_CAPTIONS_PER_IMAGE = 5  # COCO / Flickr30k retrieval: 5 captions per image
FIRST_WORD_ID = 5  # ids 0-4 are <s>, <pad>, </s>, <unk>, <mask> in RoBERTa-style vocabularies
BOS_ID, _EOS_ID, _MASK_ID = 0, 2, 4


def padded(size: int, div: int) -> int:
    """``size`` rounded up to a multiple of ``div`` (``SIZE_DIVISIBILITY``; 0: no rounding)."""
    return int(math.ceil(size / max(div, 1)) * max(div, 1))


def reference_cfg(cfg: CfgNode) -> CfgNode:
    """``cfg`` with ``REFERENCE_OVERRIDES`` applied (frozen)."""
    ref = cfg.clone()
    ref.defrost()
    ref.merge_from_list([x for kv in REFERENCE_OVERRIDES.items() for x in kv])
    ref.freeze()
    return ref


def _check_text(cfg: CfgNode) -> None:
    """Raise ValueError when the vocabulary or text length is too small for synthetic text."""
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    if lb.VOCAB_SIZE <= FIRST_WORD_ID + 1 or lb.MAX_QUERY_LEN < 4:
        raise ValueError(
            "synthetic text needs MODEL.LANGUAGE_BACKBONE.VOCAB_SIZE > 6 and MAX_QUERY_LEN >= 4, "
            f"got {lb.VOCAB_SIZE} and {lb.MAX_QUERY_LEN}"
        )


def detector_prompt(cfg: CfgNode, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A detection prompt ``<s> a b . c d . ... </s> <pad>...`` as the mapper tokenizes it.

    One label per class (``DYHEAD.NUM_CLASSES - 1``): two word tokens and a separator each, one
    word when two do not fit, and as many labels as fit.

    Returns:
        ``input_ids`` (T,), ``attention_mask`` (T,) and ``label_token_map`` (L, T) bool.
    """
    _check_text(cfg)
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    length, room = lb.MAX_QUERY_LEN, lb.MAX_QUERY_LEN - 2  # room: all but <s> and </s>
    num_labels = max(cfg.MODEL.DYHEAD.NUM_CLASSES - 1, 1)
    span = 2 if 3 * num_labels <= room else 1
    num_labels = min(num_labels, room // (span + 1))
    ids = torch.full((length,), lb.PAD_TOKEN_ID, dtype=torch.long)
    label_map = torch.zeros(num_labels, length, dtype=torch.bool)
    ids[0], pos = BOS_ID, 1
    for label in range(num_labels):
        words = torch.randint(FIRST_WORD_ID + 1, lb.VOCAB_SIZE, (span,), generator=generator)
        ids[pos : pos + span] = words
        label_map[label, pos : pos + span] = True
        ids[pos + span] = FIRST_WORD_ID  # the "." separator
        pos += span + 1
    ids[pos] = _EOS_ID
    return ids, (torch.arange(length) <= pos).long(), label_map


def detector_batch(
    cfg: CfgNode, batch: int, height: int, width: int, num_boxes: int, seed: int = 0
) -> list[dict]:
    """Synthetic ``GroundingDatasetMapper`` training outputs (without ``instances``: inference).

    Args:
        cfg: the config (text length, vocabulary, number of classes).
        batch: number of images B.
        height, width: image size H, W (already resized, as the mapper outputs it).
        num_boxes: ground-truth boxes G per image (sides 5-50 % of the image's).
        seed: RNG seed.

    Returns:
        B dicts with ``image`` uint8 (3, H, W), ``height``, ``width``, ``input_ids`` /
        ``attention_mask`` (T,), ``label_token_map`` (L, T) and ``instances`` (``gt_boxes`` (G, 4)
        xyxy, ``gt_classes`` (G,), ``gt_positive_map`` (G, T)).
    """
    g = torch.Generator().manual_seed(seed)
    wh = torch.tensor([float(width), float(height)])
    records = []
    for _ in range(batch):
        ids, mask, label_map = detector_prompt(cfg, g)
        classes = torch.randint(0, label_map.shape[0], (num_boxes,), generator=g)
        sides = (0.05 + 0.45 * torch.rand(num_boxes, 2, generator=g)) * wh
        corner = torch.rand(num_boxes, 2, generator=g) * (wh - sides)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.cat([corner, corner + sides], dim=1))
        instances.gt_classes = classes
        instances.gt_positive_map = label_map[classes]
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        records.append(
            dict(image=image, height=height, width=width, input_ids=ids, attention_mask=mask)
        )
        records[-1].update(label_token_map=label_map, instances=instances)
    return records


def chunked_prompts(
    cfg: CfgNode, num_names: int, chunk: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """A vocabulary of ``num_names`` names in prompts of ``chunk`` names, as LVIS evaluation
    tokenizes it: two word tokens and a separator per name, each chunk padded to T.

    Returns:
        ``input_ids`` / ``attention_mask`` (K, T) and ``label_token_map`` (K, chunk, T).
    """
    _check_text(cfg)
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    length = lb.MAX_QUERY_LEN
    if 3 * chunk + 2 > length:
        raise ValueError(f"--chunk {chunk} names need {3 * chunk + 2} tokens > MAX_QUERY_LEN")
    num_chunks = -(-num_names // chunk)
    ids = torch.full((num_chunks, length), lb.PAD_TOKEN_ID, dtype=torch.long)
    label_map = torch.zeros(num_chunks, chunk, length, dtype=torch.bool)
    for k in range(num_chunks):
        ids[k, 0], pos = BOS_ID, 1
        for label in range(min(chunk, num_names - k * chunk)):
            ids[k, pos : pos + 2] = torch.randint(
                FIRST_WORD_ID + 1, lb.VOCAB_SIZE, (2,), generator=generator
            )
            label_map[k, label, pos : pos + 2] = True
            ids[k, pos + 2] = FIRST_WORD_ID
            pos += 3
        ids[k, pos] = _EOS_ID
    return ids, (ids != lb.PAD_TOKEN_ID).long(), label_map


class _SyntheticVocab:
    """What :func:`mask_tokens_for_mlm` reads from a tokenizer, for a RoBERTa-style id layout."""

    def __init__(self, vocab_size: int, pad_id: int):
        self.mask_token_id = _MASK_ID
        self.all_special_ids = sorted({BOS_ID, pad_id, _EOS_ID, 3, _MASK_ID})
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size


def coarse_batch(
    cfg: CfgNode, batch: int, height: int, width: int, train: bool, seed: int = 0
) -> list[dict]:
    """Synthetic ``CaptionDatasetMapper`` outputs.

    Args:
        cfg: the config (text length, vocabulary, MLM probability).
        batch: number of images B.
        height, width: image size (the mapper gives S x S).
        train: one caption with MLM inputs per image, else 5 captions per image (evaluation).
        seed: RNG seed.

    Returns:
        B dicts with ``image`` uint8 (3, H, W), ``height``, ``width`` and ``input_ids`` /
        ``attention_mask`` (T,) plus ``mlm_input_ids`` / ``mlm_labels`` (T,) in training, or
        ``input_ids`` / ``attention_mask`` (5, T) for evaluation.
    """
    _check_text(cfg)
    lb = cfg.MODEL.LANGUAGE_BACKBONE
    length, vocab = lb.MAX_QUERY_LEN, lb.VOCAB_SIZE
    g = torch.Generator().manual_seed(seed)
    real = max(3, (3 * length) // 4)  # <s> caption </s>, then padding
    k = 1 if train else _EVAL_CAPTIONS_PER_IMAGE
    records = []
    for _ in range(batch):
        ids = torch.full((k, length), lb.PAD_TOKEN_ID, dtype=torch.long)
        ids[:, 0], ids[:, real - 1] = BOS_ID, _EOS_ID
        ids[:, 1 : real - 1] = torch.randint(FIRST_WORD_ID, vocab, (k, real - 2), generator=g)
        mask = (torch.arange(length) < real).long().repeat(k, 1)
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        record = dict(image=image, height=height, width=width, input_ids=ids, attention_mask=mask)
        if train:
            record.update(input_ids=ids[0], attention_mask=mask[0])
            masked, labels = mask_tokens_for_mlm(
                ids[0], _SyntheticVocab(vocab, lb.PAD_TOKEN_ID), cfg.MODEL.COARSE.MLM_PROBABILITY, g
            )
            record.update(mlm_input_ids=masked, mlm_labels=labels)
        records.append(record)
    return records


def input_size(cfg: CfgNode, args: argparse.Namespace) -> tuple[int, int]:
    """(H, W) of the synthetic images: --height/--width, else the configured test size."""
    return tool_image_size(cfg, args.height, args.width)


def model_inputs(cfg: CfgNode, args: argparse.Namespace, train: bool) -> tuple[list, int, int]:
    """The synthetic batch and the (padded) size the model runs at."""
    height, width = input_size(cfg, args)
    if is_coarse_stage(cfg):
        batch_negatives = cfg.MODEL.COARSE.ITM_NEGATIVES == "batch"
        if train and "itm" in cfg.MODEL.COARSE.LOSSES and batch_negatives and args.batch < 2:
            raise ValueError(
                f"coarse --task train with ITM_NEGATIVES 'batch' needs --batch >= 2 (hard negatives"
                f" come from the batch), got --batch {args.batch}"
            )
        return coarse_batch(cfg, args.batch, height, width, train), height, width
    batch = detector_batch(cfg, args.batch, height, width, args.boxes)
    if not train:
        for record in batch:
            del record["instances"]
    div = cfg.INPUT.SIZE_DIVISIBILITY
    return batch, padded(height, div), padded(width, div)
