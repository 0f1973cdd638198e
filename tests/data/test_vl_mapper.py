"""FusedTaskMapper (the image / text half of the VQA and NLVR2 mappers): INPUT.VL_CACHE_IMAGES keeps
each image once read, with the same output as reading it again."""

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_d2.config import ConfigError
from fiber_d2.data import vl_mapper
from fiber_d2.data.datasets.common import BadRecordError
from fiber_d2.data.vl_mapper import FusedTaskMapper


class _Mapper(FusedTaskMapper):
    def __call__(self, dataset_dict: dict) -> dict:
        return {"image": self.image(dataset_dict), **self.encode(dataset_dict["text"], "toy")}


def _mapper(tokenizer, is_train=True, **kwargs):
    return _Mapper(is_train=is_train, image_size=32, tokenizer=tokenizer, max_query_len=8, **kwargs)


@pytest.fixture
def image_file(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def test_cached_images_are_read_once_and_equal_the_uncached(
    shapes_tokenizer, image_file, monkeypatch
):
    reads = []
    read = vl_mapper.read_vl_image
    monkeypatch.setattr(
        vl_mapper, "read_vl_image", lambda record, *a: reads.append(1) or read(record, *a)
    )
    plain = _mapper(shapes_tokenizer, image_format="BGR")
    cached = _mapper(shapes_tokenizer, image_format="BGR", cache_images=True)
    record = {"file_name": image_file, "text": "a red circle"}
    expected = plain(record)["image"]
    assert len(reads) == 1 and expected.shape == (3, 32, 32) and expected.dtype == torch.uint8
    first = cached(dict(record, text="a blue square"))["image"]
    first[0, 0, 0] += 1  # what a caller does to its copy does not reach the cache
    again = cached(record)["image"]
    assert len(reads) == 2  # plain once, cached once
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_a_random_training_transform_cannot_be_cached(shapes_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="INPUT.VL_CACHE_IMAGES needs INPUT.VL_TRAIN_TRANSFORM"):
        _mapper(shapes_tokenizer, train_transform="albef_randaug", cache_images=True)
    # evaluation always resizes: the evaluation mapper of the same config may cache
    mapper = _mapper(
        shapes_tokenizer, is_train=False, train_transform="albef_randaug", cache_images=True
    )
    missing = {"file_name": str(tmp_path / "missing.png"), "text": "x"}
    for _ in range(2):  # a failed read is not cached: it fails again, naming the file
        with pytest.raises(BadRecordError, match="cannot read image .*missing.png"):
            mapper(missing)


@pytest.mark.parametrize("image_format, expected", [("RGB", [200, 30, 10]), ("BGR", [10, 30, 200])])
def test_images_come_out_in_the_configured_channel_order(
    shapes_tokenizer, tmp_path, image_format, expected
):
    """An RGB (200, 30, 10) image file is (3, S, S) in INPUT.FORMAT order: RGB keeps the channels,
    BGR reverses them."""
    path = tmp_path / "orange.png"
    Image.fromarray(np.full((20, 30, 3), (200, 30, 10), np.uint8)).save(path)
    mapper = _mapper(shapes_tokenizer, is_train=False, image_format=image_format)
    image = mapper({"file_name": str(path), "text": "x"})["image"]
    assert image[:, 5, 5].tolist() == expected
