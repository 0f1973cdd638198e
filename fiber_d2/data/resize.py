"""The fine-grained stage's resize: detectron2's ``ResizeShortestEdge`` with the original FIBER's
output size.

The original (maskrcnn-benchmark's ``Resize``, fine-grained spec §6.3) and detectron2 agree on the
rule (shorter side to S, longer side at most M, aspect kept) but not on the arithmetic: the original
lowers S to ``round(M * short / long)`` when the longer side would pass M and then *truncates* the
longer side (``int(S * long / short)``), where detectron2 scales both sides and *rounds* them. A
480 x 640 COCO image at S = 800 becomes 800 x 1066 in the original and 800 x 1067 in detectron2; a
500 x 1200 one 555 x 1332 against 555 x 1333. Converted weights only give the original's outputs on
the original's input, so every fine-grained path (dataset mapper, predictor, exported runners) uses
this size. The pixels are resampled as in both (PIL bilinear).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from detectron2.data import transforms as T

__all__ = ["FIBERResizeShortestEdge"]


class FIBERResizeShortestEdge(T.ResizeShortestEdge):
    """``ResizeShortestEdge`` (same arguments, same sampling of the short side) whose output size
    is the original FIBER's (see the module docstring)."""

    @staticmethod
    def get_output_shape(
        oldh: int, oldw: int, short_edge_length: int, max_size: int
    ) -> Tuple[int, int]:
        """(new height, new width) of an ``oldh`` x ``oldw`` image for short side
        ``short_edge_length`` and long side at most ``max_size``."""
        short, long = min(oldh, oldw), max(oldh, oldw)
        size = short_edge_length
        if long / short * size > max_size:
            # at least 1: the original's rounding gives 0 past an aspect ratio of 2 * max_size
            # (1 x 513 at max_size 256), which no resize can produce; such an image keeps its side
            size = max(1, int(round(max_size * short / long)))
        if short == size:
            return oldh, oldw
        if oldw < oldh:
            return int(size * oldh / oldw), size
        return size, int(size * oldw / oldh)

    def get_transform(self, image: np.ndarray) -> T.Transform:
        # detectron2's draw of the short side, this class's output size (the parent calls
        # ResizeShortestEdge.get_output_shape by name, so overriding that alone would not do)
        h, w = image.shape[:2]
        if self.is_range:
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        if size == 0:
            return T.NoOpTransform()
        newh, neww = self.get_output_shape(h, w, int(size), self.max_size)
        return T.ResizeTransform(h, w, newh, neww, self.interp)
