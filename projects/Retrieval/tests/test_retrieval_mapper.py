"""FalseImageCaptionMapper: every training sample carries a uniformly drawn *other* image."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from retrieval.mapper import FalseImageCaptionMapper

from fiber_d2.text import build_tokenizer

COLOURS = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255), "d.png": (90, 90, 90)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("false_images")
    paths = {}
    for name, rgb in COLOURS.items():
        path = root / name
        Image.fromarray(np.full((20, 24, 3), rgb, dtype=np.uint8)).save(path)
        paths[name] = str(path)
    return paths


def _mapper(files, is_train=True, pool=None):
    mapper = FalseImageCaptionMapper(
        is_train=is_train,
        image_size=16,
        tokenizer=build_tokenizer("builtin:shapes"),
        image_format="RGB",
        max_query_len=12,
        mlm_probability=0.0,
        image_files=pool if pool is not None else list(files.values()),
    )
    mapper.generator = torch.Generator().manual_seed(0)
    return mapper


def test_false_image_is_never_the_own_image_and_uniform_over_the_others(files):
    mapper = _mapper(files)
    record = {"file_name": files["b.png"], "image_id": 2, "caption": "a green square"}
    counts = Counter()
    for _ in range(300):
        out = mapper(record)
        name = out["false_file_name"]
        assert name != files["b.png"]
        # the tensor is that file's image, resized like the positive (solid colours survive resizing)
        rgb = COLOURS[name.rsplit("/", 1)[-1]]
        assert out["false_image"].shape == out["image"].shape == (3, 16, 16)
        assert out["false_image"].dtype == torch.uint8
        assert torch.equal(out["false_image"][:, 8, 8], torch.tensor(rgb, dtype=torch.uint8))
        counts[name] += 1
    assert set(counts) == {files["a.png"], files["c.png"], files["d.png"]}
    assert all(70 <= c <= 130 for c in counts.values()), counts  # 100 expected each


def test_pool_duplicates_do_not_bias_the_draw(files):
    # one record per caption: image a three times in the pool, still drawn like any other image
    pool = [files["a.png"]] * 3 + [files["b.png"], files["c.png"]]
    mapper = _mapper(files, pool=pool)
    assert mapper.image_files == [files["a.png"], files["b.png"], files["c.png"]]
    draws = Counter(mapper.draw_false_index(files["c.png"]) for _ in range(400))
    assert set(draws) == {0, 1} and abs(draws[0] - draws[1]) < 80
    # a file outside the pool may get any pool image
    assert {mapper.draw_false_index("elsewhere.png") for _ in range(60)} == {0, 1, 2}


def test_evaluation_records_get_no_false_image(files):
    mapper = _mapper(files, is_train=False)
    out = mapper({"file_name": files["a.png"], "image_id": 1, "captions": ["x", "y"]})
    assert "false_image" not in out and out["input_ids"].shape == (2, 12)


def test_unreadable_false_images_skip_the_sample(files, tmp_path):
    missing = str(tmp_path / "missing.png")
    mapper = _mapper(files, pool=[files["a.png"], missing])
    assert mapper({"file_name": files["a.png"], "image_id": 1, "caption": "red"}) is None
    with pytest.raises(ValueError, match="at least 2 distinct"):
        _mapper(files, pool=[files["a.png"], files["a.png"]])


def test_false_images_are_read_as_stored_like_the_positive(tmp_path):
    """A false image with an EXIF orientation tag is read as stored, as the positive one and the
    original (PIL open + convert); INPUT.EXIF_ORIENTATION turns both upright."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees
    turned, other = str(tmp_path / "turned.png"), str(tmp_path / "other.png")
    Image.fromarray(pixels).save(turned, exif=exif.tobytes())
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(other)
    mapper = _mapper({}, pool=[turned, other])
    record = {"file_name": other, "image_id": 1, "caption": "red"}
    stored = torch.as_tensor(pixels.transpose(2, 0, 1).copy())
    assert torch.equal(mapper(record)["false_image"], stored)
    mapper.exif_orientation = True
    assert torch.equal(mapper(record)["false_image"], stored.flip(1, 2))
