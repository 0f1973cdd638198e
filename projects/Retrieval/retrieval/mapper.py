"""``FalseImageCaptionMapper``: caption training records plus one random "false" image each.

Random-negative ITM (coarse spec §3.5, ``draw_false_image = 1``): every training sample carries an image
drawn uniformly from the whole training set; the model pairs half of the batch's captions with it.
The original draws a uniformly random *sample* index and may hit the sample's own image (or another
caption of it); here the draw is uniform over the *other distinct images* (keyed by file name), so a
negative is never the positive's image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.config import configurable

from fiber_d2.data.caption_mapper import CaptionDatasetMapper
from fiber_d2.data.datasets.common import IMAGE_READ_ERRORS
from fiber_d2.data.reading import read_image_file

__all__ = ["FalseImageCaptionMapper"]

logger = logging.getLogger(__name__)

_MAX_DRAWS = 5  # unreadable false images tolerated per sample before the sample is skipped


class FalseImageCaptionMapper(CaptionDatasetMapper):
    """:class:`fiber_d2.data.caption_mapper.CaptionDatasetMapper` that adds ``false_image`` (3, S, S)
    uint8 (the transform of ``image``, its random flip / augmentation drawn anew) and
    ``false_file_name`` to every training record."""

    @configurable
    def __init__(self, *, image_files: Sequence[str], **kwargs):
        """
        Args:
            image_files: file names of the pool the false images are drawn from (the training set);
                duplicates are ignored. It must hold at least two distinct images.
            kwargs: the arguments of :class:`~fiber_d2.data.caption_mapper.CaptionDatasetMapper`.
        """
        super().__init__(**kwargs)
        self.image_files = list(dict.fromkeys(image_files))
        if len(self.image_files) < 2:
            raise ValueError(
                f"random-negative ITM needs at least 2 distinct training images, got"
                f" {len(self.image_files)}"
            )
        self._index = {name: i for i, name in enumerate(self.image_files)}

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, *, dataset_dicts: Sequence[dict]):
        ret = super().from_config(cfg, is_train)
        ret["image_files"] = [d["file_name"] for d in dataset_dicts]
        return ret

    def draw_false_index(self, file_name: str) -> int:
        """Index into ``image_files`` of a uniformly drawn image other than ``file_name``.

        Uses ``self.generator`` (torch's global RNG when None, which detectron2 seeds per worker).
        """
        n = len(self.image_files)
        own = self._index.get(file_name)
        if own is None:  # not in the pool: every pool image is "other"
            return int(torch.randint(n, (1,), generator=self.generator))
        j = int(torch.randint(n - 1, (1,), generator=self.generator))
        return j + (j >= own)  # skip the sample's own image, uniform over the rest

    def __call__(self, dataset_dict: dict) -> dict | None:
        """Map one record; training records also get ``false_image`` and ``false_file_name``.

        Args:
            dataset_dict: a caption record.

        Returns:
            the model input dict, or None when the record (or every drawn false image) is unusable.
        """
        out = super().__call__(dataset_dict)
        if out is None or not self.is_train:
            return out
        for _ in range(_MAX_DRAWS):
            name = self.image_files[self.draw_false_index(dataset_dict["file_name"])]
            try:
                image = read_image_file(name, self.image_format, self.exif_orientation)
            except IMAGE_READ_ERRORS as e:
                logger.warning("false image %s is unreadable (%s); drawing another", name, e)
                continue
            chw = np.ascontiguousarray(self.augment(image).transpose(2, 0, 1))
            out.update(false_image=torch.as_tensor(chw), false_file_name=name)
            return out
        self.bad.skip(dataset_dict, f"{_MAX_DRAWS} unreadable false images in a row")
        return None
