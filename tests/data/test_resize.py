"""The fine-grained resize has the original FIBER's output size (maskrcnn-benchmark's ``Resize``:
the short side lowered to round(M * short / long) when the long side would pass M, the long side
truncated), in the dataset mapper, the predictor and the exported runners."""

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import transforms as T

from fiber_d2.config import add_fiber_config
from fiber_d2.data.mapper import GroundingDatasetMapper
from fiber_d2.data.resize import FIBERResizeShortestEdge


@pytest.mark.parametrize(
    "old, short, max_size, original, detectron2",
    [
        # 800 * 640 / 480 = 1066.67: truncated by the original, rounded by detectron2
        ((480, 640), 800, 1333, (800, 1066), (800, 1067)),
        ((640, 480), 800, 1333, (1066, 800), (1067, 800)),
        # 1200 / 500 * 800 > 1333: short side round(1333 * 500 / 1200) = round(555.4) = 555, long
        # side int(555 * 1200 / 500) = 1332; detectron2 scales both sides to a long side of 1333
        ((500, 1200), 800, 1333, (555, 1332), (555, 1333)),
        # 1000 / 600 * 800 > 1333: short side round(799.8) = 800 (truncating would give 799)
        ((600, 1000), 800, 1333, (800, 1333), (800, 1333)),
        # where both agree: an exact ratio, an image already at the size, a square
        ((427, 640), 800, 1333, (800, 1199), (800, 1199)),
        ((800, 1000), 800, 1333, (800, 1000), (800, 1000)),
        ((128, 160), 144, 256, (144, 180), (144, 180)),
        ((300, 300), 800, 1333, (800, 800), (800, 800)),
    ],
)
def test_output_shape_is_the_originals(old, short, max_size, original, detectron2):
    assert FIBERResizeShortestEdge.get_output_shape(*old, short, max_size) == original
    assert T.ResizeShortestEdge.get_output_shape(*old, short, max_size) == detectron2
    image = np.zeros((*old, 3), dtype=np.uint8)
    transform = FIBERResizeShortestEdge((short,), max_size, "choice").get_transform(image)
    assert transform.apply_image(image).shape[:2] == original


def test_range_sampling_draws_the_short_side_as_detectron2():
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    resize = FIBERResizeShortestEdge((700, 701), 1333, "range")
    sizes = {resize.get_transform(image).apply_image(image).shape[:2] for _ in range(40)}
    assert sizes == {(700, 933), (701, 934)}  # 933.33 and 934.67, truncated


@pytest.mark.parametrize("old", [(1, 513), (3, 2000), (2000, 1)])
def test_extreme_aspect_ratios_keep_a_side_of_one(old):
    """Past an aspect ratio of 2 * max_size the original's rounding gives a side of 0, and PIL
    refused the resize ("height and width must be > 0")."""
    image = np.zeros((*old, 3), dtype=np.uint8)
    resized = FIBERResizeShortestEdge((144,), 256, "choice").get_transform(image).apply_image(image)
    assert min(resized.shape[:2]) == 1
    assert max(resized.shape[:2]) == int(max(old) / min(old))


def test_short_side_zero_is_no_resize():
    image = np.zeros((30, 47, 3), dtype=np.uint8)
    assert isinstance(
        FIBERResizeShortestEdge((0,), 100, "choice").get_transform(image), T.NoOpTransform
    )


def test_the_dataset_mapper_uses_it(shapes_tokenizer_dir):
    """(FIBERPredictor: tests/test_predictor.py; the exported runners: tests/deploy/test_export.py)"""
    cfg = add_fiber_config(get_cfg())
    cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER = str(shapes_tokenizer_dir)
    for is_train in (True, False):
        mapper = GroundingDatasetMapper(cfg, is_train=is_train, dataset_names=["toy"])
        assert type(mapper.augmentations.augs[0]) is FIBERResizeShortestEdge
