"""Detections to the image frame with the original's arithmetic (scale the legacy box, then +1),
and the boxes the original's LVIS / Flickr30k / RefCOCO evaluations read (no +1)."""

import pytest
import torch
from detectron2.structures import Boxes, Instances

from fiber_d2.modeling.head.postprocess import original_eval_boxes, to_image_frame


def test_legacy_boxes_are_scaled_then_given_their_last_pixel():
    # a 100 x 160 input of an 80 x 128 image (scale 0.8); legacy boxes, the second on the input's
    # last pixel column and row (159, 99)
    result = Instances((100, 160))
    result.pred_boxes = Boxes(torch.tensor([[10.0, 20.0, 49.0, 59.0], [100.0, 50.0, 159.0, 99.0]]))
    result.scores = torch.tensor([0.9, 0.4])
    out = to_image_frame(result, 80, 128)
    assert out.image_size == (80, 128) and torch.equal(out.scores, result.scores)
    expected = result.pred_boxes.tensor * 0.8 + torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(out.pred_boxes.tensor, expected)
    # 159 * 0.8 + 1 = 128.2: kept beyond the image's 128 px (not clipped), as in the original's
    # COCO results
    assert out.pred_boxes.tensor[1, 2].item() == pytest.approx(128.2)
    back = original_eval_boxes(out)  # the scaled legacy boxes
    torch.testing.assert_close(back.pred_boxes.tensor, result.pred_boxes.tensor * 0.8)
    torch.testing.assert_close(out.pred_boxes.tensor, expected)  # out is not modified


def test_a_one_pixel_box_survives():
    result = Instances((10, 10))
    result.pred_boxes = Boxes(torch.tensor([[3.0, 3.0, 3.0, 3.0]]))  # one pixel, legacy
    result.scores = torch.tensor([0.5])
    out = to_image_frame(result, 20, 20)
    assert len(out) == 1
    torch.testing.assert_close(out.pred_boxes.tensor, torch.tensor([[6.0, 6.0, 7.0, 7.0]]))
