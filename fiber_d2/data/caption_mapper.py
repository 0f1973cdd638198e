"""``CaptionDatasetMapper``: caption records -> the coarse stage's inputs (image, tokens, MLM).

Bad records are handled as by :class:`~fiber_d2.data.mapper.GroundingDatasetMapper`: skipped with a
counted warning in training, a one-line :class:`~fiber_d2.data.datasets.common.BadRecordError` at test
time (retrieval recall needs every image and caption once).
"""

from __future__ import annotations

import copy
from typing import List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from PIL import Image

from ..config import ConfigError
from ..text import build_tokenizer, mask_tokens_for_mlm, tokenize
from .mapper import BadRecordCounter, memoized, to_chw
from .reading import SkipRecord, evaluation_error, read_record_image
from .vl_transforms import build_vl_image_transform

__all__ = ["CaptionDatasetMapper"]


class CaptionDatasetMapper:
    """Map caption records to the coarse stage's inputs.

    Output: ``image`` uint8 (3, S, S) in ``INPUT.FORMAT`` (square bicubic resize, optional
    flip; or ALBEF's RandAugment in training), ``height``/``width`` of the original, ``image_id``,
    ``file_name``, ``task``;
    a training record (``caption``) gives ``input_ids``/``attention_mask`` (T,) plus
    ``mlm_input_ids``/``mlm_labels`` (T,) (labels -100 where not masked); an evaluation record
    (``captions``, K of them) gives ``input_ids``/``attention_mask`` (K, T).
    """

    # every image comes out S x S: training batches are not grouped by aspect ratio
    # (FIBERTrainer.build_train_loader)
    square_images = True

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        image_size: int,
        tokenizer,
        image_format: str = "RGB",
        max_query_len: int = 40,
        flip_prob: float = 0.0,
        mlm_probability: float = 0.15,
        cache_images: bool = False,
        train_transform: str = "resize",
        exif_orientation: bool = False,
    ):
        """
        Args:
            is_train: training (flip, MLM inputs) or evaluation behaviour.
            image_size: side S of the square resize (``INPUT.IMAGE_SIZE``).
            tokenizer: a fast tokenizer, or a name for :func:`fiber_d2.text.build_tokenizer`.
            image_format: ``INPUT.FORMAT`` of the output image.
            max_query_len: padded token length T.
            flip_prob: horizontal flip probability in training.
            mlm_probability: MLM selection probability (0 disables the MLM fields).
            cache_images: keep each image once read and resized (``INPUT.VL_CACHE_IMAGES``; S x S x
                3 bytes per distinct image); needs the deterministic training transform.
            train_transform: ``INPUT.VL_TRAIN_TRANSFORM``: "resize" (the square resize, flipped
                with ``flip_prob``) or "albef_randaug" (the original's retrieval and captioning
                fine-tuning: random crop, flip and RandAugment; ``flip_prob`` unused) in training.
            exif_orientation: turn images upright by their EXIF tag (``INPUT.EXIF_ORIENTATION``;
                see :func:`~fiber_d2.data.reading.read_image_file`).

        Raises:
            ConfigError: ``cache_images`` with a random training transform.
            ValueError: an unknown transform.
        """
        random_transform = flip_prob > 0 or train_transform != "resize"
        if cache_images and is_train and random_transform:
            raise ConfigError(
                "INPUT.VL_CACHE_IMAGES needs INPUT.CAPTION_FLIP_PROB 0 and INPUT.VL_TRAIN_TRANSFORM "
                "'resize' in training (a random transform is drawn anew for every use), got "
                f"{flip_prob} and {train_transform!r}"
            )
        self.is_train = is_train
        augs: List[T.Augmentation] = [T.Resize((image_size, image_size), interp=Image.BICUBIC)]
        if is_train and flip_prob > 0:
            augs.append(T.RandomFlip(prob=flip_prob, horizontal=True))
        self.augmentations = T.AugmentationList(augs)
        # INPUT.VL_TRAIN_TRANSFORM (an unknown name is an error): in training "albef_randaug"
        # replaces the augmentation list above; "resize" is what that list already does
        vl_transform = build_vl_image_transform(train_transform, image_size, is_train)
        self._randaug = vl_transform if is_train and train_transform == "albef_randaug" else None
        self.tokenizer = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.image_format = image_format
        self.exif_orientation = exif_orientation
        self.max_query_len = max_query_len
        self.mlm_probability = mlm_probability
        self.generator: Optional[torch.Generator] = None  # torch's global RNG by default
        self.bad = BadRecordCounter()
        # (file name, height, width) of a record -> (its (3, S, S) uint8 input, original height, width)
        self._image_cache: Optional[dict] = {} if cache_images else None

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "tokenizer": build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER),
            "image_format": cfg.INPUT.FORMAT,
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            "flip_prob": cfg.INPUT.CAPTION_FLIP_PROB,
            "mlm_probability": (
                cfg.MODEL.COARSE.MLM_PROBABILITY if "mlm" in cfg.MODEL.COARSE.LOSSES else 0.0
            ),
            "cache_images": cfg.INPUT.VL_CACHE_IMAGES,
            "train_transform": cfg.INPUT.VL_TRAIN_TRANSFORM,
            "exif_orientation": cfg.INPUT.EXIF_ORIENTATION,
        }

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        """Map one caption record.

        Args:
            dataset_dict: a caption record (``caption`` or ``captions``).

        Returns:
            the model input dict; in training None for a bad record (skipped with a warning).

        Raises:
            BadRecordError: at test time, a record that cannot be evaluated (never replaced by
                another: retrieval recall needs every image and caption once).
        """
        record = copy.copy(dataset_dict)
        try:
            texts = record.get("captions", record.get("caption"))
            single = isinstance(texts, str)
            texts = [texts] if single else list(texts or [])
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise SkipRecord("empty caption")
            image, height, width = self._image(record)
            enc = tokenize(self.tokenizer, texts, self.max_query_len)
        except (SkipRecord, ValueError, KeyError) as e:
            if not self.is_train:
                raise evaluation_error(record, e, as_empty_hint=False) from None
            self.bad.skip(record, str(e))
            return None
        out = dict(record)
        out.update(
            image=image,
            height=height,
            width=width,
            task="caption",
            input_ids=enc["input_ids"][0] if single else enc["input_ids"],
            attention_mask=enc["attention_mask"][0] if single else enc["attention_mask"],
        )
        if self.is_train and single and self.mlm_probability > 0:
            masked, labels = mask_tokens_for_mlm(
                out["input_ids"], self.tokenizer, self.mlm_probability, self.generator
            )
            out.update(mlm_input_ids=masked, mlm_labels=labels)
        return out

    def augment(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 image in ``INPUT.FORMAT`` -> the (S, S, 3) uint8 input: RandAugment in
        training with ``train_transform`` "albef_randaug", the square resize (and flip) otherwise.
        """
        if self._randaug is not None:
            return self._randaug(image)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        return aug_input.image

    def _image(self, record: dict) -> tuple:
        """The record's (3, S, S) uint8 input image and its original height and width; with the
        image cache, read and resized once per (file, height, width)."""

        def read() -> tuple:
            raw = read_record_image(record, self.image_format, self.exif_orientation)
            return to_chw(self.augment(raw)), raw.shape[0], raw.shape[1]

        key = (record.get("file_name"), record.get("height"), record.get("width"))
        image, height, width = memoized(self._image_cache, key, read)
        return (image if self._image_cache is None else image.clone()), height, width
