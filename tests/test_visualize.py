"""draw_grounding / grounding_labels on hand-built Instances (no model)."""

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from fiber_d2.visualize import draw_grounding, grounding_labels

H, W = 120, 160


def _instances(boxes, scores, classes, size=(H, W)):
    inst = Instances(size)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.long)
    return inst


@pytest.fixture
def image():
    return np.full((H, W, 3), 128, dtype=np.uint8)


def test_labels_name_and_percentage():
    names = ["red circle", "a very long phrase that goes on and on and on"]
    assert grounding_labels([0, 1], [0.874, 0.05], names, max_chars=20) == [
        "red circle 87%",
        "a very long phras... 5%",
    ]
    with pytest.raises(ValueError, match="predicted label 2 has no name"):
        grounding_labels([2], [0.5], names)


def test_threshold_decides_what_is_drawn(image):
    inst = _instances([[40, 50, 100, 90]], [0.6], [0])
    untouched = draw_grounding(image, inst, ["red circle"], threshold=0.7)
    assert untouched.shape == image.shape and untouched.dtype == np.uint8
    assert np.array_equal(untouched, image)  # nothing reaches 0.7: the image is unchanged

    drawn = draw_grounding(image, inst, ["red circle"], threshold=0.5)
    assert drawn.shape == image.shape
    changed = (drawn != image).any(axis=2)
    assert changed[60:85, 38:43].all()  # the left edge of the box (below its label)
    assert changed[60:85, 98:103].all()  # the right edge
    assert not changed[100:, :].any() and not changed[:, 150:].any()  # far from box and label
    assert not changed[65:80, 55:85].any()  # box interior: outline only, no fill


def test_boxes_of_one_label_share_a_colour(image):
    inst = _instances(
        [[10, 60, 50, 110], [100, 60, 150, 110], [60, 5, 90, 40]], [0.9, 0.8, 0.7], [1, 1, 0]
    )
    drawn = draw_grounding(image, inst, ["a", "b"], threshold=0.0).astype(int)
    left_a, left_b, left_c = drawn[95, 10], drawn[95, 100], drawn[30, 60]  # left edges
    assert np.array_equal(left_a, left_b)
    assert not np.array_equal(left_a, left_c)


def test_bad_inputs(image):
    inst = _instances([[1, 1, 5, 5]], [0.9], [0], size=(H + 1, W))
    with pytest.raises(ValueError, match="121x160 image, the image is 120x160"):
        draw_grounding(image, inst, ["x"])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        draw_grounding(image[:, :, 0], _instances([], [], []), ["x"])


def test_scale_enlarges_the_drawing(image):
    inst = _instances([[40, 50, 100, 90]], [0.6], [0])
    drawn = draw_grounding(image, inst, ["red circle"], threshold=0.5, scale=2.0)
    assert drawn.shape == (2 * H, 2 * W, 3)
    changed = (drawn != 128).any(axis=2)
    assert changed[130:170, 79:82].all() and not changed[130:170, 60:70].any()  # edge at x=80
