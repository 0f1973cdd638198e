"""Every image input a predictor accepts, as a uint8 array in the model's channel order.

Accepted: BGR uint8 numpy arrays (H, W, 3) (detectron2 / OpenCV order; RGB with
``image_format="RGB"``), PIL images, file paths, and uint8 torch tensors (3, H, W) or (H, W, 3)
(torchvision order: RGB unless ``image_format="BGR"``). Used by
:class:`fiber_d2.predictor.FIBERPredictor` (``read_image``) and the exported runners. A file is
turned upright by its EXIF orientation tag (detectron2's ``read_image``), as a user's photo is
meant to be seen; dataset images are read as stored (``INPUT.EXIF_ORIENTATION``).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from PIL import Image

from ..data.datasets.common import IMAGE_READ_ERRORS

__all__ = ["ImageLike", "image_to_array"]

ImageLike = Union[np.ndarray, str, os.PathLike, Image.Image, torch.Tensor]

# PIL modes of more than 8 bits per pixel: converting them to RGB clips every value above 255, so a
# 16-bit photo would be read as a white image
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _check_eight_bit(mode: str) -> None:
    if mode in _WIDE_MODES:
        raise ValueError(
            f"its pixels are {mode} (16-bit or float), which 8-bit RGB would clip to white; save "
            "it as an 8-bit image"
        )


def image_to_array(
    image: ImageLike, input_format: str, image_format: Optional[str] = None
) -> np.ndarray:
    """Any accepted image as a uint8 array (H, W, 3) in the model's channel order.

    Args:
        image: a uint8 numpy array (H, W, 3), a PIL image, a file path, or a uint8 torch
            tensor (3, H, W) or (H, W, 3); grayscale arrays and tensors (H, W), (H, W, 1) or
            (1, H, W) are repeated over the three channels.
        input_format: the model's channel order (``INPUT.FORMAT``): "BGR" or "RGB".
        image_format: channel order of an array / tensor: "BGR" or "RGB"; None: BGR for
            numpy arrays (OpenCV / detectron2), RGB for tensors (torchvision).

    Returns:
        uint8 array (H, W, 3), possibly a flipped view of ``image``.

    Raises:
        FileNotFoundError: a missing file. ValueError: an unreadable file (a 16-bit or float one
        too) or a wrong array.
    """
    if image_format not in (None, "BGR", "RGB"):
        raise ValueError(f"image_format must be 'BGR' or 'RGB', got {image_format!r}")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as header:  # reads the header only
                _check_eight_bit(header.mode)
            return utils.read_image(path, format=input_format)
        except IMAGE_READ_ERRORS as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
    if isinstance(image, Image.Image):
        try:
            _check_eight_bit(image.mode)
        except ValueError as e:
            raise ValueError(f"cannot read the PIL image: {e}") from None
        array = np.asarray(image.convert("RGB"))
        return array[:, :, ::-1] if input_format == "BGR" else array
    order = image_format
    if isinstance(image, torch.Tensor):
        order = order or "RGB"
        array = image.detach().cpu()
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
            array = array.permute(1, 2, 0)
        elif array.ndim == 3 and array.shape[0] == 1 and array.shape[2] != 1:
            array = array[0]  # (1, H, W) grayscale
        image = array.numpy()
    elif not isinstance(image, np.ndarray):
        raise ValueError(
            f"image must be a numpy array, PIL image, path or tensor, got {type(image)}"
        )
    order = order or "BGR"
    if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)):
        # grayscale (H, W) or (H, W, 1): the same value in every channel, as PIL's "L" converts
        return np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a BGR uint8 array (H, W, 3) (RGB with image_format='RGB'), "
            f"got {image.dtype} {image.shape}"
        )
    return image[:, :, ::-1] if order != input_format else image
