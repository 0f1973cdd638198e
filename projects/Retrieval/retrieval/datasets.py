"""Flickr30k Karpathy caption splits (coarse spec §5.2, §7.2). fiber_d2's built-in registrations
(:mod:`fiber_d2.data.datasets.builtin`) already hold these names, with the same files and splits;
:func:`register_f30k_karpathy` registers only those that are missing.

==============================  ==================================================  ===============
name                            annotation file (under ``$DETECTRON2_DATASETS``)    records
==============================  ==================================================  ===============
f30k_caption_karpathy_train     flickr30k/annotations/dataset_flickr30k.json         one per caption
                                (Karpathy ``train`` + ``val`` splits, as FIBER)
f30k_caption_karpathy_val       same file, ``val`` split (1,014 images)              one per image
f30k_caption_karpathy_test      same file, ``test`` split (1,000 images)             one per image
==============================  ==================================================  ===============

Images: ``flickr30k/flickr30k-images/<filename>`` (the official archive's flat folder). Nothing is read at
import; the evaluator type is "retrieval".
"""

from __future__ import annotations

import logging
import os

from detectron2.data import DatasetCatalog

from fiber_d2.data.datasets import register_captions

__all__ = ["F30K_KARPATHY_SPLITS", "register_f30k_karpathy"]

logger = logging.getLogger(__name__)

# name -> (Karpathy splits kept, one record per caption)
F30K_KARPATHY_SPLITS = {
    "f30k_caption_karpathy_train": (("train", "val"), True),
    "f30k_caption_karpathy_val": (("val",), False),
    "f30k_caption_karpathy_test": (("test",), False),
}


def register_f30k_karpathy(root: str | None = None) -> None:
    """Register the Flickr30k Karpathy caption splits (names already registered are left alone).

    Args:
        root: datasets root (default ``$DETECTRON2_DATASETS`` or ``datasets``).
    """
    root = root or os.getenv("DETECTRON2_DATASETS", "datasets")
    karpathy = os.path.join(root, "flickr30k", "annotations", "dataset_flickr30k.json")
    image_root = os.path.join(root, "flickr30k", "flickr30k-images")
    registered = set(DatasetCatalog.list())
    for name, (splits, per_caption) in F30K_KARPATHY_SPLITS.items():
        if name in registered:
            logger.debug("%s is already registered; kept", name)
            continue
        register_captions(name, karpathy, image_root, splits=splits, one_per_caption=per_caption)
