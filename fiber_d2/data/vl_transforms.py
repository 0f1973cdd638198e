"""Image transforms of the coarse stage's downstream tasks (coarse spec §4, §5.2).

* ``"resize"`` (the original's ``albef``): square bicubic resize to S x S.
* ``"albef_randaug"``: RandomResizedCrop(S, scale (0.5, 1.0), bicubic), horizontal flip (the text is not
  changed), then :class:`AlbefRandAugment`.

torchvision's ``RandAugment`` differs from the original's (it always applies its ops, draws from
another op list including Posterize/Solarize/Color/Contrast and uses other magnitude scales), so the
original's variant is written here: numpy lookup tables and OpenCV's affine warps, computed as the
original computes them (OpenCV and PIL warps differ by half a pixel and in their interpolation).

Images are HWC uint8 numpy arrays in and out (the mappers' format). :func:`read_vl_image` reads one
from a file or from a row of one of the original's Arrow files (coarse spec §7).
"""

from __future__ import annotations

import functools
import io
import random
from typing import Callable, Optional

import cv2
import numpy as np
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from .reading import read_image_file

__all__ = ["AlbefRandAugment", "build_vl_image_transform", "read_vl_image", "VL_TRANSFORMS"]

VL_TRANSFORMS = ("resize", "albef_randaug")
_FILL = (128, 128, 128)


def _per_channel(image: np.ndarray, lut_of: Callable[[np.ndarray], Optional[np.ndarray]]):
    """Maps each channel of an HWC uint8 image through the 256-entry table that ``lut_of(channel)``
    returns; a channel for which it returns None stays."""
    out = image.copy()
    for c in range(image.shape[2]):
        lut = lut_of(image[..., c])
        if lut is not None:
            out[..., c] = lut[image[..., c]]
    return out


def autocontrast(image: np.ndarray) -> np.ndarray:
    """The original's AutoContrast (cutoff 0): a channel with values ``lo..hi`` (``hi > lo``) goes
    through ``v * s + o``, ``s = 255 / (hi - lo)``, clipped to 0..255 and truncated. The original
    writes the offset ``o`` as ``-lo * s`` with ``lo`` a numpy uint8 scalar, whose negation wraps
    around: ``o = ((256 - lo) % 256) * s``. So a channel whose minimum is 0 is stretched to 0..255,
    as PIL's ``autocontrast`` would, while any other non-constant channel becomes 255 everywhere.
    The released checkpoints were fine-tuned with that, so it is kept; a constant channel stays."""

    def lut(channel):
        lo, hi = int(channel.min()), int(channel.max())
        if hi <= lo:
            return None
        scale = 255 / (hi - lo)
        table = np.arange(256) * scale + ((256 - lo) % 256) * scale
        return np.clip(table, 0, 255).astype(np.uint8)

    return _per_channel(image, lut)


def equalize(image: np.ndarray) -> np.ndarray:
    """The original's Equalize (PIL's rule): per channel, with ``step`` the pixel count outside the
    last occupied histogram bin, floor-divided by 255, value ``v`` maps to
    ``(step // 2 + #pixels below v) // step``, clipped to 255; a channel with ``step`` 0 stays."""

    def lut(channel):
        hist = np.bincount(channel.ravel(), minlength=256)
        occupied = hist[hist > 0]
        step = int(occupied[:-1].sum()) // 255
        if step == 0:
            return None
        below = np.concatenate([[0], np.cumsum(hist)[:-1]])
        return np.clip((step // 2 + below) // step, 0, 255).astype(np.uint8)

    return _per_channel(image, lut)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """``v * factor`` in float32, clipped to 0..255 and truncated (the original's table)."""
    table = np.arange(256, dtype=np.float32) * np.float32(factor)
    return np.clip(table, 0, 255).astype(np.uint8)[image]


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """The original's Sharpness: ``smooth + factor * (image - smooth)`` on the interior pixels, with
    ``smooth`` the 3 x 3 smoothing (1 1 1 / 1 5 1 / 1 1 1, over 13; OpenCV's ``filter2D``, rounded to
    uint8), computed in float32 and cast to uint8 without clipping: values beyond 0..255 wrap around
    (truncated, then modulo 256), as the original's numpy cast does on x86. Border pixels stay.
    Factor 0 returns the smoothed image and 1 the image, as the original's special cases do."""
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5.0
    smooth = cv2.filter2D(image, -1, kernel / 13.0)
    if factor == 0.0:
        return smooth
    if factor == 1.0 or min(image.shape[:2]) < 3:
        return image
    out = image.astype(np.float32)
    inner = (slice(1, -1), slice(1, -1))
    blur = smooth[inner].astype(np.float32)
    out[inner] = blur + np.float32(factor) * (out[inner] - blur)
    return (np.trunc(out).astype(np.int64) % 256).astype(np.uint8)


def warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """OpenCV's affine warp (``matrix`` 2 x 3 maps input to output pixel coordinates; bilinear, the
    outside filled with grey 128), as all of the original's geometric ops."""
    h, w = image.shape[:2]
    return cv2.warpAffine(
        image,
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=_FILL,
    )


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise by ``degrees`` about (W / 2, H / 2) in OpenCV's pixel coordinates (pixel
    centres at integers, so half a pixel off PIL's centre)."""
    h, w = image.shape[:2]
    return warp(image, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0))


def shear(image: np.ndarray, factor: float, axis: str) -> np.ndarray:
    """``x' = x + factor * y`` (axis "x") or ``y' = y + factor * x`` (axis "y"): about the top-left
    corner, whose row / column stays."""
    a, b = (factor, 0.0) if axis == "x" else (0.0, factor)
    return warp(image, np.float32([[1, a, 0], [b, 1, 0]]))


def translate(image: np.ndarray, offset: float, axis: str) -> np.ndarray:
    """Content moves by ``-offset`` px along ``axis`` (the original's sign; its draws are symmetric)."""
    dx, dy = (-offset, 0.0) if axis == "x" else (0.0, -offset)
    return warp(image, np.float32([[1, 0, dx], [0, 1, dy]]))


class AlbefRandAugment:
    """The original's RandAugment (ALBEF's, on HWC uint8 arrays): N ops drawn with replacement, each
    applied with probability 0.5 at magnitude M of 10 (coarse spec §5.2: N = 2, M = 7: rotate
    +-30 M / 10 deg, shear +-0.3 M / 10, translate +-10 M / 10 px, brightness / sharpness factor
    1.8 M / 10 + 0.1 (1.36 at M = 7); fill grey 128). Each op computes as the original's does,
    OpenCV warps included (:func:`autocontrast` keeps the original's overflow)."""

    OPS = (
        "Identity",
        "AutoContrast",
        "Equalize",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    )

    def __init__(self, n: int = 2, m: int = 7, rng: Optional[random.Random] = None):
        self.n, self.m = n, m
        self.rng = rng or random  # default: the global generator (seeded per worker)

    def _signed(self, value: float) -> float:
        return value if self.rng.random() < 0.5 else -value

    def apply(self, image: np.ndarray, op: str) -> np.ndarray:
        """Apply one op at magnitude ``self.m`` to an HWC uint8 array (the magnitudes are written
        as the original computes them, so that they round alike)."""
        level = self.m / 10
        if op == "Identity":
            return image
        if op == "AutoContrast":
            return autocontrast(image)
        if op == "Equalize":
            return equalize(image)
        if op == "Brightness":
            return brightness(image, level * 1.8 + 0.1)
        if op == "Sharpness":
            return sharpness(image, level * 1.8 + 0.1)
        if op in ("ShearX", "ShearY"):
            return shear(image, self._signed(level * 0.3), op[-1].lower())
        if op in ("TranslateX", "TranslateY"):
            return translate(image, self._signed(level * 10.0), op[-1].lower())
        if op == "Rotate":
            return rotate(image, self._signed(level * 30))
        raise KeyError(op)

    def __call__(self, image) -> np.ndarray:
        image = np.asarray(image)
        for op in self.rng.choices(self.OPS, k=self.n):
            if self.rng.random() < 0.5:
                image = self.apply(image, op)
        return image


def build_vl_image_transform(
    name: str, image_size: int, is_train: bool, rng: Optional[random.Random] = None
) -> Callable[[np.ndarray], np.ndarray]:
    """The transform ``name`` (evaluation always uses ``"resize"``), HWC uint8 -> (S, S, 3) uint8.

    Args:
        name: one of :data:`VL_TRANSFORMS`.
        image_size: S.
        is_train: training (``name``) or evaluation (plain resize).
        rng: random source of the flip and RandAugment draws (default: Python's global generator,
            which detectron2 seeds from ``SEED`` in every DataLoader worker).

    Raises:
        ValueError: an unknown ``name``.
    """
    if name not in VL_TRANSFORMS:
        raise ValueError(f"INPUT.VL_TRAIN_TRANSFORM must be one of {VL_TRANSFORMS}, got {name!r}")
    rng = rng or random
    size = (image_size, image_size)

    def resize(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))

    if not is_train or name == "resize":
        return resize
    crop = RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC)
    randaug = AlbefRandAugment(2, 7, rng)

    def albef_randaug(image: np.ndarray) -> np.ndarray:
        pil = crop(Image.fromarray(image))
        if rng.random() < 0.5:
            pil = ImageOps.mirror(pil)
        return randaug(pil)

    return albef_randaug


@functools.lru_cache(maxsize=8)
def _arrow_table(path: str):
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def read_vl_image(
    record: dict,
    file_key: str = "file_name",
    column: str = "image",
    exif_orientation: bool = False,
) -> np.ndarray:
    """An RGB HWC uint8 image of ``record``: from ``record[file_key]``, or, when the record has
    ``arrow_file`` / ``arrow_row``, the encoded bytes in ``column`` of that Arrow row. As stored,
    or turned upright by its EXIF tag with ``exif_orientation`` (``INPUT.EXIF_ORIENTATION``; see
    :func:`fiber_d2.data.reading.read_image_file`).

    Raises:
        OSError / ValueError: a missing or unreadable image (the message names the file).
    """
    if "arrow_file" in record:
        data = _arrow_table(record["arrow_file"]).column(column)[record["arrow_row"]].as_py()
        return read_image_file(io.BytesIO(data), "RGB", exif_orientation)
    return read_image_file(record[file_key], "RGB", exif_orientation)
