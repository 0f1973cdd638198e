"""Dataset images are read as stored, EXIF orientation tag or not (the original's PIL ``open`` +
``convert("RGB")``; the public datasets' boxes and sizes are on the stored pixel grid), unless
``INPUT.EXIF_ORIENTATION`` asks to turn them upright first (detectron2's ``read_image``)."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from fiber_d2.config import add_fiber_config
from fiber_d2.data import vl_transforms
from fiber_d2.data.caption_mapper import CaptionDatasetMapper
from fiber_d2.data.datasets.common import BadRecordError
from fiber_d2.data.mapper import GroundingDatasetMapper
from fiber_d2.data.reading import read_image_file
from fiber_d2.data.vl_mapper import FusedTaskMapper
from fiber_d2.data.vl_transforms import read_vl_image

ORIENTATION = 0x0112  # the EXIF tag
H, W = 40, 60


@pytest.fixture
def pixels():
    """A stored (H, W) image that no rotation or flip leaves unchanged."""
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def save(path, pixels, orientation=None):
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return str(path)


def test_read_image_file_keeps_the_stored_grid(tmp_path, pixels, monkeypatch):
    turned = save(tmp_path / "turned.png", pixels, orientation=3)  # "rotate 180 degrees"
    np.testing.assert_array_equal(read_image_file(turned), pixels)
    np.testing.assert_array_equal(read_image_file(turned, "BGR"), pixels[:, :, ::-1])
    with open(turned, "rb") as f:  # a file object (the original's Arrow bytes) reads the same
        np.testing.assert_array_equal(read_image_file(io.BytesIO(f.read())), pixels)
    np.testing.assert_array_equal(
        read_image_file(turned, exif_orientation=True), pixels[::-1, ::-1]
    )
    side = save(tmp_path / "side.png", pixels, orientation=6)  # "rotate 90 degrees clockwise"
    assert read_image_file(side).shape == (H, W, 3)
    assert read_image_file(side, exif_orientation=True).shape == (W, H, 3)
    # the reader of the VQA / NLVR2 / image-tower mappers, from a file and from an Arrow row's bytes
    np.testing.assert_array_equal(read_vl_image({"file_name": turned}), pixels)
    np.testing.assert_array_equal(
        read_vl_image({"file_name": turned}, exif_orientation=True), pixels[::-1, ::-1]
    )
    with open(turned, "rb") as f:
        data = f.read()
    # the one call read_vl_image makes of the Arrow table (pyarrow is optional)
    rows = SimpleNamespace(column=lambda name: [SimpleNamespace(as_py=lambda: data)])
    monkeypatch.setattr(vl_transforms, "_arrow_table", lambda path: rows)
    row = {"arrow_file": "rows.arrow", "arrow_row": 0}
    np.testing.assert_array_equal(read_vl_image(row), pixels)
    np.testing.assert_array_equal(read_vl_image(row, exif_orientation=True), pixels[::-1, ::-1])


def _grounding(tokenizer, is_train=True, **kwargs):
    return GroundingDatasetMapper(
        is_train=is_train,
        augmentations=[T.ResizeShortestEdge((80,), 1000, "choice")],
        tokenizer=tokenizer,
        category_names={"toy": ["red box", "blue box"]},
        control_prob=(0.0, 1.0, 0.0, 0.0),
        max_query_len=16,
        **kwargs,
    )


def _det_record(path):
    box = {"bbox": [10, 5, 20, 15], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    return {"file_name": path, "height": H, "width": W, "image_id": 1, "dataset_name": "toy",
            "task": "detection", "annotations": [box]}  # fmt: skip


def test_grounding_mapper_reads_tagged_images_as_stored(shapes_tokenizer, tmp_path, pixels):
    """A tagged file maps exactly as its untagged pixels: the same image under the same boxes."""
    plain = save(tmp_path / "plain.png", pixels)
    turned = save(tmp_path / "turned.png", pixels, orientation=3)
    mapper = _grounding(shapes_tokenizer)
    expected, got = mapper(_det_record(plain)), mapper(_det_record(turned))
    assert torch.equal(got["image"], expected["image"])
    assert torch.equal(got["instances"].gt_boxes.tensor, expected["instances"].gt_boxes.tensor)
    # INPUT.EXIF_ORIENTATION: turned upright first, as detectron2 reads it
    upright = save(tmp_path / "upright.png", np.ascontiguousarray(pixels[::-1, ::-1]))
    exif_mapper = _grounding(shapes_tokenizer, exif_orientation=True)
    assert torch.equal(
        exif_mapper(_det_record(turned))["image"], mapper(_det_record(upright))["image"]
    )
    # a 90-degree tag turned upright no longer fits the record's height and width
    side = save(tmp_path / "side.png", pixels, orientation=6)
    test_mapper = _grounding(shapes_tokenizer, is_train=False, exif_orientation=True)
    with pytest.raises(BadRecordError, match="image is 60x40, the record says 40x60"):
        test_mapper(_det_record(side))
    as_stored = _grounding(shapes_tokenizer, is_train=False)(_det_record(side))
    assert as_stored["image"].shape[1:] == (80, 120)


def test_caption_and_fused_task_mappers_read_tagged_images_as_stored(
    shapes_tokenizer, tmp_path, pixels
):
    plain = save(tmp_path / "plain.png", pixels)
    turned = save(tmp_path / "turned.png", pixels, orientation=3)
    caption = CaptionDatasetMapper(
        is_train=False, image_size=24, tokenizer=shapes_tokenizer, max_query_len=8
    )
    record = {"image_id": 1, "captions": ["a red box"]}
    expected = caption(dict(record, file_name=plain))["image"]
    assert torch.equal(caption(dict(record, file_name=turned))["image"], expected)
    caption.exif_orientation = True
    assert not torch.equal(caption(dict(record, file_name=turned))["image"], expected)

    class Fused(FusedTaskMapper):
        def __call__(self, record):
            return self.image(record)

    fused = Fused(is_train=False, image_size=24, tokenizer=shapes_tokenizer, max_query_len=8)
    assert torch.equal(fused({"file_name": turned}), fused({"file_name": plain}))
    fused.exif_orientation = True
    assert not torch.equal(fused({"file_name": turned}), fused({"file_name": plain}))


@pytest.mark.parametrize("value", [False, True])
def test_input_exif_orientation_reaches_every_mapper(shapes_tokenizer_dir, value):
    cfg = add_fiber_config(get_cfg())
    assert cfg.INPUT.EXIF_ORIENTATION is False  # the original's reading by default
    cfg.INPUT.EXIF_ORIENTATION = value
    cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER = str(shapes_tokenizer_dir)
    mappers = [
        GroundingDatasetMapper(cfg, is_train=False, dataset_names=["toy"]),
        CaptionDatasetMapper(cfg, is_train=False),
        FusedTaskMapper(cfg, is_train=False),
    ]
    assert [m.exif_orientation for m in mappers] == [value] * 3


def test_predictor_turns_a_photo_file_upright(tmp_path, pixels):
    """FIBERPredictor's reader (a user's photo, no boxes) does what detectron2 does."""
    from fiber_d2.inference.images import image_to_array

    turned = save(tmp_path / "photo.png", pixels, orientation=3)
    np.testing.assert_array_equal(image_to_array(turned, "RGB"), pixels[::-1, ::-1])


@pytest.mark.parametrize("orientation", [None, 3, 6, 8])
def test_pre_run_size_check_reads_the_size_as_the_mapper_does(tmp_path, pixels, orientation):
    """A test record's size is compared with the image as the detector's mapper will read it:
    as stored, or turned upright with INPUT.EXIF_ORIENTATION (orientations 5-8 swap the sides)."""
    from fiber_d2.data.datasets.common import _undecodable

    path = save(tmp_path / "a.jpg", pixels, orientation)
    turned = orientation in (6, 8)
    stored = {"file_name": path, "task": "detection", "height": H, "width": W}
    upright = dict(stored, height=W, width=H) if turned else stored
    assert _undecodable([stored], exif_orientation=False) == ""
    assert _undecodable([upright], exif_orientation=True) == ""
    if turned:
        assert "the record says 60x40" in _undecodable([upright], exif_orientation=False)
        assert "the record says 40x60" in _undecodable([stored], exif_orientation=True)
