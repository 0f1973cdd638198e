"""Tests of fiber_d2.inference.images: every accepted image input -> the model's channel order."""

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_d2.inference.images import image_to_array


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)


@pytest.mark.parametrize("model_format", ["BGR", "RGB"])
def test_every_input_kind_gives_the_model_order(rgb, model_format, tmp_path):
    want = rgb if model_format == "RGB" else rgb[:, :, ::-1]
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    inputs = [
        (np.ascontiguousarray(rgb[:, :, ::-1]), None),  # numpy: BGR by default
        (rgb, "RGB"),
        (Image.fromarray(rgb), None),
        (str(path), None),
        (path, None),
        (chw, None),  # tensors: RGB by default
        (chw.permute(1, 2, 0), None),
        (chw.flip(0), "BGR"),
    ]
    for i, (image, image_format) in enumerate(inputs):
        got = image_to_array(image, model_format, image_format)
        assert got.dtype == np.uint8 and np.array_equal(got, want), i
    gray = Image.fromarray(rgb).convert("L")  # other PIL modes are converted to RGB first
    assert np.array_equal(image_to_array(gray, model_format), np.stack([np.asarray(gray)] * 3, 2))
    # grayscale arrays and tensors read as the PIL "L" image does (they were refused)
    plain = np.asarray(gray)
    for image in (plain, plain[:, :, None], torch.from_numpy(plain), torch.from_numpy(plain)[None]):
        assert np.array_equal(image_to_array(image, model_format), np.stack([plain] * 3, 2))


def test_bad_images_raise_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        image_to_array(str(tmp_path / "nope.png"), "BGR")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        image_to_array(bad, "BGR")
    with pytest.raises(ValueError, match="BGR uint8 array"):
        image_to_array(np.zeros((4, 4), np.float32), "BGR")
    with pytest.raises(ValueError, match="BGR uint8 array"):
        image_to_array(np.zeros((4, 4, 2), np.uint8), "BGR")
    with pytest.raises(ValueError, match="BGR uint8 array"):
        image_to_array(np.zeros((4, 4, 3), np.float32), "BGR")
    with pytest.raises(ValueError, match="image_format must be"):
        image_to_array(np.zeros((4, 4, 3), np.uint8), "BGR", "HSV")
    with pytest.raises(ValueError, match="numpy array, PIL image, path or tensor"):
        image_to_array([[1, 2, 3]], "BGR")


def test_images_too_large_to_decode_or_wider_than_eight_bits(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (an image over twice ``Image.MAX_IMAGE_PIXELS``) was a
    traceback, none of the read errors caught; a 16-bit PNG read as a white image, no word."""
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels: over twice the limit
    with pytest.raises(ValueError, match=r"cannot read image .*big.png: .*decompression bomb"):
        image_to_array(path, "BGR")
    monkeypatch.undo()
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 8), 4000, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    with pytest.raises(ValueError, match=r"cannot read image .*deep.png: its pixels are I.*16-bit"):
        image_to_array(deep, "BGR")
    with pytest.raises(ValueError, match=r"cannot read the PIL image: its pixels are F"):
        image_to_array(Image.new("F", (4, 4)), "BGR")
