"""``FusedTaskMapper``: the shared half of the mappers of the fused-``cls_feats`` tasks (VQA, NLVR2).

It reads and transforms images (:mod:`fiber_d2.data.vl_transforms`; files or the original's Arrow rows)
and tokenizes texts to a fixed length, counting truncated texts with a warning. Subclasses implement
``__call__`` for their records. With ``INPUT.VL_CACHE_IMAGES`` and a deterministic transform it keeps
each image it has read, as returned, and reads the file only once.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from detectron2.config import configurable

from ..config import ConfigError
from ..text import build_tokenizer
from .datasets.common import IMAGE_READ_ERRORS, BadRecordError
from .mapper import memoized
from .vl_transforms import build_vl_image_transform, read_vl_image

__all__ = ["FusedTaskMapper"]

logger = logging.getLogger(__name__)


class FusedTaskMapper:
    """Image and text encoding for fused-task records (see the module docstring)."""

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
        max_query_len: int = 50,
        train_transform: str = "resize",
        cache_images: bool = False,
        exif_orientation: bool = False,
    ):
        """
        Args:
            is_train: training (``train_transform``) or evaluation (plain resize).
            image_size: side S of the square input.
            tokenizer: a fast tokenizer or a name for :func:`fiber_d2.text.build_tokenizer`.
            image_format: "RGB" or "BGR" channel order of the output images.
            max_query_len: padded text length T (specials included).
            train_transform: ``INPUT.VL_TRAIN_TRANSFORM``.
            cache_images: keep each image once read and transformed (``INPUT.VL_CACHE_IMAGES``;
                S x S x 3 bytes per distinct image: 48 KB at 128 px, 1 MB at 576 px); needs the
                deterministic "resize" transform in training.
            exif_orientation: turn images upright by their EXIF tag (``INPUT.EXIF_ORIENTATION``;
                see :func:`~fiber_d2.data.reading.read_image_file`).

        Raises:
            ConfigError: ``cache_images`` with a random training transform.
        """
        if cache_images and is_train and train_transform != "resize":
            raise ConfigError(
                "INPUT.VL_CACHE_IMAGES needs INPUT.VL_TRAIN_TRANSFORM 'resize' in training (a random "
                f"transform is drawn anew for every use), got {train_transform!r}"
            )
        self.is_train = is_train
        # flips and RandAugment draw from Python's global generator, which detectron2 seeds from
        # SEED in each DataLoader worker (a private generator would repeat in every worker)
        self.transform = build_vl_image_transform(train_transform, image_size, is_train)
        self.tokenizer = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.bgr = image_format == "BGR"
        self.max_query_len = max_query_len
        self.exif_orientation = exif_orientation
        self.truncated = 0
        # file name, or (Arrow file, row, column) -> the (3, S, S) uint8 image as image() returns it
        self._image_cache: dict | None = {} if cache_images else None

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "tokenizer": build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER),
            "image_format": cfg.INPUT.FORMAT,
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            "train_transform": cfg.INPUT.VL_TRAIN_TRANSFORM,
            "cache_images": cfg.INPUT.VL_CACHE_IMAGES,
            "exif_orientation": cfg.INPUT.EXIF_ORIENTATION,
        }

    def encode(self, text: str, record_name: str) -> dict[str, torch.Tensor]:
        """(T,) ``input_ids`` / ``attention_mask`` of ``text``; a truncation is counted and logged."""
        enc = self.tokenizer(
            text, padding="max_length", truncation=True, max_length=self.max_query_len
        )
        full = len(self.tokenizer(text, truncation=False)["input_ids"])
        if full > self.max_query_len:
            self.truncated += 1
            logger.warning(
                "%s: text of %d tokens truncated to %d (%d texts truncated so far)",
                record_name,
                full,
                self.max_query_len,
                self.truncated,
            )
        return {
            "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
        }

    def image(
        self, record: dict, file_key: str = "file_name", column: str = "image", name: str = ""
    ) -> torch.Tensor:
        """(3, S, S) uint8 tensor of a record's image in the configured channel order.

        Raises:
            BadRecordError "<name>: cannot read image <file>: ..." when it cannot be read (a user
            error: one ``error:`` line from the command-line tools).
        """
        try:
            return self._cached_image(record, file_key, column)
        except BadRecordError as e:
            if not name:
                raise
            raise BadRecordError(f"{name}: {e}") from None

    def _cached_image(self, record: dict, file_key: str, column: str) -> torch.Tensor:
        if self._image_cache is None:
            return self._read_image(record, file_key, column)
        key = (
            (record["arrow_file"], record["arrow_row"], column)
            if "arrow_file" in record
            else record.get(file_key)
        )
        return memoized(
            self._image_cache, key, lambda: self._read_image(record, file_key, column)
        ).clone()

    def _read_image(self, record: dict, file_key: str, column: str) -> torch.Tensor:
        try:
            image = self.transform(read_vl_image(record, file_key, column, self.exif_orientation))
        except IMAGE_READ_ERRORS as e:
            message = " ".join(str(e).split())
            raise BadRecordError(f"cannot read image {record.get(file_key)}: {message}") from None
        if self.bgr:
            image = image[:, :, ::-1]
        return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def __call__(self, dataset_dict: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError
