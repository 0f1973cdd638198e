"""draw_grounding / grounding_labels on hand-built Instances (no model)."""

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from fiber_d2.visualize import _place_labels, draw_grounding, grounding_labels, side_by_side

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
    untouched = draw_grounding(image, inst, ["red circle"], threshold=0.7, min_size=0)
    assert untouched.shape == image.shape and untouched.dtype == np.uint8
    assert np.array_equal(untouched, image)  # nothing reaches 0.7: the image is unchanged

    drawn = draw_grounding(image, inst, ["red circle"], threshold=0.5, min_size=0)
    assert drawn.shape == image.shape
    changed = (drawn != image).any(axis=2)
    assert changed[60:85, 38:43].all()  # the left edge of the box (below its label)
    assert changed[60:85, 98:103].all()  # the right edge
    assert not changed[100:, :].any() and not changed[:, 150:].any()  # far from box and label
    assert not changed[65:80, 55:85].any()  # box interior: outline only, no fill


def test_a_box_scoring_exactly_the_threshold_is_drawn(image):
    """The threshold is the lowest drawn score ("at least"), as FIBERPredictor's threshold keeps
    scores >= it."""
    inst = _instances([[40, 50, 100, 90]], [0.5], [0])
    drawn = draw_grounding(image, inst, ["red circle"], threshold=0.5, min_size=0)
    assert (drawn != image).any(axis=2)[60:85, 38:43].all()  # the box's left edge


def test_boxes_of_one_label_share_a_colour(image):
    inst = _instances(
        [[10, 60, 50, 110], [100, 60, 150, 110], [60, 5, 90, 40]], [0.9, 0.8, 0.7], [1, 1, 0]
    )
    drawn = draw_grounding(image, inst, ["a", "b"], threshold=0.0, min_size=0).astype(int)
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


def test_small_images_are_upscaled_to_a_readable_size(image):
    inst = _instances([[40, 50, 100, 90]], [0.6], [0])
    drawn = draw_grounding(image, inst, ["red circle"], threshold=0.5)
    assert min(drawn.shape[:2]) >= 512 and abs(drawn.shape[1] / drawn.shape[0] - W / H) < 0.01
    f = drawn.shape[0] / H
    changed = (drawn != 128).any(axis=2)
    x = round(40 * f)
    assert changed[round(70 * f), x - 1 : x + 2].any()  # the left edge, moved with the image
    big = np.full((600, 700, 3), 128, np.uint8)
    assert draw_grounding(big, _instances([], [], [], (600, 700)), ["x"]).shape == big.shape


def test_a_thin_image_is_not_upscaled_past_the_drawing_limit():
    """A 1 x 300 image brought to a 512 shorter side was a 512 x 153,600 canvas (minutes)."""
    from fiber_d2.visualize import MAX_DRAWN_SIDE

    thin = np.full((1, 300, 3), 128, np.uint8)
    drawn = draw_grounding(thin, _instances([[0, 0, 50, 1]], [0.9], [0], (1, 300)), ["x"])
    assert drawn.shape[1] == MAX_DRAWN_SIDE and drawn.shape[0] < 20
    with pytest.raises(ValueError, match="at most 4096 px a side"):
        draw_grounding(thin, _instances([], [], [], (1, 300)), ["x"], scale=1000.0)


def test_a_large_photo_is_drawn_at_the_drawing_limit():
    """A 6000 x 5800 photo was drawn at full size (5 GB); now at MAX_DRAWN_SIDE a side, the boxes
    scaled with it."""
    from fiber_d2.visualize import MAX_DRAWN_SIDE

    long = np.full((100, 2 * MAX_DRAWN_SIDE, 3), 128, np.uint8)
    box = [[1000, 20, 3000, 80]]
    drawn = draw_grounding(long, _instances(box, [0.9], [0], (100, 2 * MAX_DRAWN_SIDE)), ["x"])
    assert drawn.shape == (50, MAX_DRAWN_SIDE, 3)
    changed = (drawn != 128).any(axis=2)
    assert changed[20:35, 499:502].any() and not changed[20:35, 480:490].any()  # edge at x=500


def test_labels_of_overlapping_boxes_do_not_cover_each_other():
    boxes = np.array([[10, 10, 80, 80], [12, 12, 82, 82], [11, 14, 79, 81]], dtype=float)
    sizes = [(120.0, 18.0)] * 3
    corners = _place_labels(boxes, sizes, 300, 300)
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    for i in range(3):
        assert 0 <= rects[i][0] and rects[i][2] <= 300 and 0 <= rects[i][1] and rects[i][3] <= 300
        for j in range(i):
            a, b = rects[i], rects[j]
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    # in pixels: the label colours of three nearly identical boxes all remain visible
    img = np.full((300, 300, 3), 128, np.uint8)
    inst = _instances(boxes.tolist(), [0.9, 0.8, 0.7], [0, 1, 2], size=(300, 300))
    drawn = draw_grounding(img, inst, ["red circle", "blue square", "green one"], 0.0, min_size=0)
    from detectron2.utils.colormap import colormap

    palette = (colormap(rgb=True, maximum=1) * 255).round().astype(int)
    for c in range(3):  # label background (alpha 0.85 over grey) of each label is present
        expected = (0.85 * palette[c] + 0.15 * 128).round()
        close = (np.abs(drawn.astype(int) - expected).max(axis=2) <= 3).sum()
        assert close > 100, c


def test_side_by_side_titles_and_padding():
    a = np.zeros((50, 40, 3), np.uint8)
    b = np.zeros((70, 30, 3), np.uint8)
    out = side_by_side([a, b], ["ground truth", "prediction"], gap=8)
    band = out.shape[0] - 70
    assert out.shape == (70 + band, 40 + 8 + 30, 3) and band >= 24
    assert (out[:band, :40] < 128).any() and (out[:band, 48:] < 128).any()  # titles written
    assert (out[band + 50 :, :40] == 255).all()  # the shorter image padded white
    with pytest.raises(ValueError, match="2 titles"):
        side_by_side([a, b], ["x"])
