"""The coarse tasks' image transforms (fiber_d2.data.vl_transforms): the original's ALBEF RandAugment,
op by op as the original computes it, and the crop / flip / resize around it."""

import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from fiber_d2.data.shapes import COLORS
from fiber_d2.data.vl_transforms import (
    AlbefRandAugment,
    autocontrast,
    build_vl_image_transform,
    equalize,
    rotate,
    shear,
)


def _grey(values) -> np.ndarray:
    """An HWC uint8 image with the same 2-D ``values`` in its three channels."""
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=2)


def test_albef_randaug_ops_and_transforms():
    image = np.zeros((40, 50, 3), np.uint8)
    image[10:30, 10:30] = COLORS["red"]
    aug = AlbefRandAugment(2, 7, random.Random(0))
    for op in AlbefRandAugment.OPS:
        out = aug.apply(image, op)
        assert out.shape == image.shape and out.dtype == np.uint8, op
    rotated = aug.apply(image, "Rotate")
    assert (rotated[0, 0] == 128).all()  # grey fill in the corners
    assert np.array_equal(aug.apply(image, "Identity"), image)
    train = build_vl_image_transform("albef_randaug", 32, True, random.Random(0))
    test = build_vl_image_transform("albef_randaug", 32, False)
    assert train(image).shape == test(image).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="VL_TRAIN_TRANSFORM"):
        build_vl_image_transform("autoaugment", 32, True)


def test_albef_randaug_magnitudes_at_m7():
    """Spec coarse §5.2 at M = 7: brightness factor 1.36, shear 0.21 (the affine coefficient, about
    the top-left corner as the original's warp), translation 7 px."""
    aug = AlbefRandAugment(2, 7, random.Random(0))
    assert (aug.apply(_grey(np.full((20, 20), 100)), "Brightness") == 136).all()
    line = np.zeros((41, 41), np.uint8)
    line[:, 20] = 255  # a vertical line through the centre
    sheared = aug.apply(_grey(line), "ShearX")[..., 0]
    # about the top-left corner: row 0 stays, row 30 moves by 0.21 * 30 = 6.3 px
    assert int(sheared[0].argmax()) == 20
    assert int(abs(sheared[30].argmax().astype(int) - 20)) == 6
    dot = np.zeros((41, 41), np.uint8)
    dot[20, 20] = 255
    moved = aug.apply(_grey(dot), "TranslateX")[..., 0]
    assert np.argwhere(moved == 255).tolist() in ([[20, 13]], [[20, 27]])


def test_autocontrast_keeps_the_original_uint8_overflow():
    """Channel 0 (values 0..100) is stretched by s = 255 / 100 and truncated: 50 -> 127, and 100 ->
    254 (100 * s is 254.99999999999997 in float64), as PIL does too; PIL stretches channel 1 (20..120)
    to 0 / 127 / 255, but the original's offset ``-lo * s`` negates ``lo`` as a uint8 (236), so the
    whole channel reads 255; channel 2 is constant and stays."""
    image = np.zeros((1, 3, 3), np.uint8)
    image[0, :, 0] = (0, 50, 100)
    image[0, :, 1] = (20, 70, 120)
    image[0, :, 2] = 77
    out = autocontrast(image)
    assert out[0, :, 0].tolist() == [0, 127, 254]
    assert out[0, :, 1].tolist() == [255, 255, 255]
    assert out[0, :, 2].tolist() == [77, 77, 77]
    pil = np.asarray(ImageOps.autocontrast(Image.fromarray(image)))
    assert pil[0, :, 0].tolist() == [0, 127, 254] and pil[0, :, 1].tolist() == [0, 127, 255]


def test_equalize_gives_pil_equalize():
    """The original's Equalize reproduces PIL's; checked on random images, one with a constant
    channel (left as it is), one with all pixels in two bins, and one whose last occupied bin holds
    most pixels (200 of 256 at 250: the step, which leaves that bin out, is 56 // 255 = 0, so the
    image stays)."""
    g = np.random.default_rng(0)
    images = [g.integers(0, 256, (23, 31, 3), dtype=np.uint8), g.integers(40, 90, (8, 8, 3))]
    images[1] = images[1].astype(np.uint8)
    images[1][..., 2] = 9
    images.append(_grey(np.array([[3, 3], [200, 3]])))
    images.append(_grey(np.where(np.arange(256).reshape(16, 16) < 200, 250, 10)))
    for image in images:
        expected = np.asarray(ImageOps.equalize(Image.fromarray(image)))
        assert np.array_equal(equalize(image), expected)
    assert np.array_equal(equalize(images[-1]), images[-1])


def test_rotation_is_about_opencvs_centre():
    """90 degrees counter-clockwise about (W / 2, H / 2) = (2.5, 2.5) in OpenCV's coordinates (pixel
    centres at integers): input (x, y) lands on (y, 5 - x), so output row r >= 1 is input column
    5 - r read top to bottom, and row 0 comes from outside the image (grey). PIL's rotation about
    its own centre (pixel centres at .5) would be np.rot90, with no grey row."""
    values = np.arange(25).reshape(5, 5) * 5
    out = rotate(_grey(values), 90.0)[..., 0]
    assert (out[0] == 128).all()
    for r in range(1, 5):
        assert out[r].tolist() == values[:, 5 - r].tolist()
    assert not np.array_equal(out, np.rot90(values))


def test_shear_interpolates_bilinearly_from_the_top_left_corner():
    """Shear 0.5 along x: row 0 stays; row 1 reads half a pixel to its left, so each output pixel is
    the mean of two input neighbours, grey 128 beyond the left edge ((128 + 10) / 2 = 69). Along y
    the same holds for columns."""
    image = _grey([[10, 20, 30, 40], [10, 20, 30, 40]])
    out = shear(image, 0.5, "x")[..., 0]
    assert out.tolist() == [[10, 20, 30, 40], [69, 15, 25, 35]]
    out_y = shear(np.ascontiguousarray(image.transpose(1, 0, 2)), 0.5, "y")[..., 0]
    assert out_y.T.tolist() == [[10, 20, 30, 40], [69, 15, 25, 35]]


def test_sharpness_wraps_around_as_the_original():
    """Factor 1.36 at M = 7 on a 200-grey image with one 250 pixel: the smoothing there is
    (8 * 200 + 5 * 250) / 13 = 219.2 (219), and 219 + 1.36 * 31 = 261.2 wraps to 261 - 256 = 5
    (PIL's enhancer clips it to 255); a neighbour, smoothed to 204 (203.8), reads
    204 + 1.36 * (200 - 204) = 198.6 -> 198; the border stays."""
    pixels = np.full((5, 5, 3), 200, np.uint8)
    pixels[2, 2] = 250
    out = AlbefRandAugment(2, 7, random.Random(0)).apply(pixels, "Sharpness")
    assert (out[2, 2] == 5).all()
    assert (out[1, 2] == 198).all() and (out[2, 1] == 198).all()
    assert (out[0] == 200).all() and (out[:, 0] == 200).all()


def test_albef_randaug_applies_each_drawn_op_with_probability_half():
    class Counting(AlbefRandAugment):
        calls = 0

        def apply(self, image, op):
            Counting.calls += 1
            return image

    aug = Counting(2, 7, random.Random(1))
    image = np.zeros((8, 8, 3), np.uint8)
    for _ in range(1000):
        aug(image)
    assert 850 <= Counting.calls <= 1150  # 2 draws x 0.5 x 1000


def test_albef_randaug_crop_keeps_half_the_image_and_flips_half_the_time():
    """RandomResizedCrop at scale (0.5, 1.0) (its aspect ratios 3/4..4/3): a crop keeps at least 61 %
    of the width, so it always spans both halves of a red-left / blue-right image; the horizontal
    flip puts blue on the left about half the time. Pure red and blue, so that every channel holds a
    0 and AutoContrast (with the original's overflow) stretches rather than whitens it."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (200, 0, 0)
    image[:, 32:] = (0, 0, 200)
    train = build_vl_image_transform("albef_randaug", 64, True, random.Random(2))
    flipped = 0
    for _ in range(60):
        out = train(image).astype(int)
        red, blue = out[..., 0] > out[..., 2] + 40, out[..., 2] > out[..., 0] + 40
        assert red.any() and blue.any()
        left = out[28:36, 10:14]  # inside every crop, clear of rotation / translation fill
        flipped += int(left[..., 2].mean() > left[..., 0].mean())
    assert 15 <= flipped <= 45


def test_vl_transform_draws_follow_the_seeded_global_generators():
    """Flips and RandAugment ops draw from Python's global generator (crops from torch's), both of
    which detectron2 seeds from SEED in every DataLoader worker: seeded alike, the draws repeat;
    seeded apart, they differ (a private generator would repeat in every worker instead)."""
    import torch

    image = np.zeros((40, 50, 3), np.uint8)
    image[10:30, 5:20] = COLORS["red"]

    def draws(seed):
        random.seed(seed)
        torch.manual_seed(seed)
        train = build_vl_image_transform("albef_randaug", 32, True)
        return [train(image) for _ in range(6)]

    first, again, other = draws(0), draws(0), draws(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_evaluation_transform_is_the_bicubic_square_resize():
    """Spec coarse §4 / §5.2 ("albef"): a bicubic resize to S x S, the aspect ratio not kept."""
    g = np.random.default_rng(0)
    image = g.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = build_vl_image_transform("albef_randaug", 16, False)(image)
    bicubic = np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC))
    bilinear = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR))
    assert np.array_equal(out, bicubic) and not np.array_equal(out, bilinear)


def test_geometric_ops_draw_both_directions():
    """Rotate, shear and translate draw their sign with probability 1/2 (coarse spec §5.2: +-30 M /
    10 degrees, +-0.3 M / 10, +-10 M / 10 px): over 40 draws a white block above the centre lands
    on both sides of where it was (its centroid; the grey fill of the borders stays below 200)."""
    block = np.zeros((41, 41), np.uint8)
    block[8:13, 18:23] = 255  # centred on (x 20, y 10): rotations move it left or right
    aug = AlbefRandAugment(2, 7, random.Random(0))
    for op, axis in (("Rotate", 1), ("TranslateX", 1), ("TranslateY", 0), ("ShearX", 1)):
        sides = set()
        for _ in range(40):
            out = aug.apply(_grey(block), op)[..., 0]
            centroid = np.argwhere(out > 200).mean(axis=0)[axis]
            sides.add(int(np.sign(centroid - (20 if axis == 1 else 10))))
        assert sides == {-1, 1}, op


def test_shear_y_moves_columns_along_y():
    """ShearY at M = 7 (0.21) about the top-left corner: column 0 of a horizontal line stays, column
    30 moves by 0.21 * 30 = 6.3 rows (ShearX would leave a horizontal line in place)."""
    line = np.zeros((41, 41), np.uint8)
    line[20, :] = 255
    sheared = AlbefRandAugment(2, 7, random.Random(0)).apply(_grey(line), "ShearY")[..., 0]
    assert int(sheared[:, 0].argmax()) == 20
    assert abs(int(sheared[:, 30].argmax()) - 20) == 6
