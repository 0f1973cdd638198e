"""Image transforms of the coarse stage's downstream tasks (coarse spec §4, §5.2).

* ``"resize"`` (the original's ``albef``): square bicubic resize to S x S.
* ``"albef_randaug"``: RandomResizedCrop(S, scale (0.5, 1.0), bicubic), horizontal flip (the text is not
  changed), then :class:`AlbefRandAugment`.

torchvision's ``RandAugment`` differs from the original's (it always applies its ops, draws from
another op list including Posterize/Solarize/Color/Contrast and uses other magnitude scales), so the
original's variant is written here on torchvision's functional ops.

Images are HWC uint8 numpy arrays in and out (the mappers' format). :func:`read_vl_image` reads one
from a file or from a row of one of the original's Arrow files (coarse spec §7).
"""

from __future__ import annotations

import functools
import io
import math
import random
from typing import Callable, Optional

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from .mapper import read_image_file

__all__ = ["AlbefRandAugment", "build_vl_image_transform", "read_vl_image", "VL_TRANSFORMS"]

VL_TRANSFORMS = ("resize", "albef_randaug")
_FILL = (128, 128, 128)
_BILINEAR = InterpolationMode.BILINEAR  # the original's warps interpolate linearly


def sharpen_wrapping(image: Image.Image, factor: float) -> Image.Image:
    """The original's Sharpness op: ``smooth + factor * (image - smooth)`` on the interior pixels,
    with ``smooth`` the 3 x 3 smoothing (1 1 1 / 1 5 1 / 1 1 1, over 13: PIL's ``SMOOTH``), computed
    in float and cast to uint8 without clipping: values beyond 0..255 wrap around (truncated, then
    modulo 256), as the original's numpy cast does, where PIL's enhancer clips. Border pixels stay.

    Args:
        image: an RGB PIL image.
        factor: blend factor (1.36 at M = 7).
    """
    pixels = np.asarray(image, dtype=np.float32)
    if min(pixels.shape[:2]) < 3:
        return image
    smooth = np.asarray(image.filter(ImageFilter.SMOOTH), dtype=np.float32)
    out = pixels.copy()
    inner = (slice(1, -1), slice(1, -1))
    out[inner] = smooth[inner] + factor * (pixels[inner] - smooth[inner])
    return Image.fromarray((np.trunc(out).astype(np.int64) % 256).astype(np.uint8))


class AlbefRandAugment:
    """The original's RandAugment: N ops drawn with replacement, each applied with probability 0.5 at
    magnitude M of 10 (coarse spec §5.2: N = 2, M = 7: rotate +-3M deg, shear +-0.03M, translate +-M px,
    brightness / sharpness factor 0.1 + 1.8 M / 10 (1.36 at M = 7); fill grey 128). As in the original,
    rotations and shears interpolate bilinearly, and shears are about the top-left corner."""

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

    def apply(self, image: Image.Image, op: str) -> Image.Image:
        """Apply one op at magnitude ``self.m`` to a PIL image."""
        m = self.m
        if op == "Identity":
            return image
        if op == "AutoContrast":
            return ImageOps.autocontrast(image)
        if op == "Equalize":
            return ImageOps.equalize(image)
        if op == "Brightness":
            return TF.adjust_brightness(image, 0.1 + 1.8 * m / 10.0)
        if op == "Sharpness":
            return sharpen_wrapping(image, 0.1 + 1.8 * m / 10.0)
        if op in ("ShearX", "ShearY"):
            # about the top-left corner (row / column 0 stays), as the original's affine warp
            shear = math.degrees(math.atan(self._signed(0.03 * m)))
            shear_xy = [shear, 0.0] if op == "ShearX" else [0.0, shear]
            return TF.affine(
                image,
                0.0,
                [0, 0],
                1.0,
                shear_xy,
                interpolation=_BILINEAR,
                fill=_FILL,
                center=[0, 0],
            )
        if op in ("TranslateX", "TranslateY"):
            t = int(self._signed(float(m)))
            return TF.affine(
                image, 0.0, [t, 0] if op == "TranslateX" else [0, t], 1.0, [0.0, 0.0], fill=_FILL
            )
        if op == "Rotate":
            return TF.rotate(image, self._signed(3.0 * m), interpolation=_BILINEAR, fill=_FILL)
        raise KeyError(op)

    def __call__(self, image: Image.Image) -> Image.Image:
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
        return np.asarray(randaug(pil))

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
    :func:`fiber_d2.data.mapper.read_image_file`).

    Raises:
        OSError / ValueError: a missing or unreadable image (the message names the file).
    """
    if "arrow_file" in record:
        data = _arrow_table(record["arrow_file"]).column(column)[record["arrow_row"]].as_py()
        return read_image_file(io.BytesIO(data), "RGB", exif_orientation)
    return read_image_file(record[file_key], "RGB", exif_orientation)
