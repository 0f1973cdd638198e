"""Drawing grounding / detection predictions with detectron2's ``Visualizer``.

Boxes are labelled with the phrase or category name of their label and the score; each label
keeps one colour (detectron2's colormap, indexed by label), so the boxes of one phrase match.
Used by ``tools/demo.py`` and by the ``make demo`` pipeline's prediction images.
"""

from __future__ import annotations

import logging
from typing import List, Sequence

import numpy as np
from detectron2.structures import Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer

__all__ = ["grounding_labels", "draw_grounding"]

logger = logging.getLogger(__name__)


def _shorten(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if max_chars > 0 and len(text) > max_chars:
        return text[: max(max_chars - 3, 1)] + "..."
    return text


def grounding_labels(
    classes: Sequence[int],
    scores: Sequence[float],
    label_names: Sequence[str],
    max_chars: int = 40,
) -> List[str]:
    """Box captions ``"<name> <score>"`` (score as a percentage, as detectron2 writes it).

    Args:
        classes: label index per box (N,).
        scores: score per box (N,).
        label_names: L names; ``classes`` index into it.
        max_chars: names longer than this are shortened with "..." (<= 0: never).

    Returns:
        list of N strings.

    Raises:
        ValueError: a class index outside ``label_names``.
    """
    out = []
    for c, s in zip(classes, scores):
        c = int(c)
        if not 0 <= c < len(label_names):
            raise ValueError(f"predicted label {c} has no name ({len(label_names)} label names)")
        out.append(f"{_shorten(label_names[c], max_chars)} {100.0 * float(s):.0f}%")
    return out


def draw_grounding(
    image_rgb: np.ndarray,
    instances: Instances,
    label_names: Sequence[str],
    threshold: float = 0.3,
    *,
    max_label_chars: int = 40,
    scale: float = 1.0,
) -> np.ndarray:
    """Draw the boxes scoring at least ``threshold`` on a copy of the image.

    Args:
        image_rgb: uint8 array (H, W, 3) in RGB order, the image the predictions refer to.
        instances: predictions with ``pred_boxes`` (xyxy in ``image_rgb``'s frame), ``scores``
            and ``pred_classes`` (index into ``label_names``); any device.
        label_names: L phrase / category names.
        threshold: minimum score of a drawn box.
        max_label_chars: longer names are shortened in the drawing.
        scale: output size factor (small images read better enlarged, e.g. 4 for 128 px).

    Returns:
        uint8 array (H * scale, W * scale, 3), RGB: the image with labelled boxes (equal to the
        input when no box reaches the threshold and ``scale`` is 1).

    Raises:
        ValueError: a wrong image shape, or instances of a different image size.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image_rgb must be (H, W, 3), got {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    if tuple(instances.image_size) != (height, width):
        raise ValueError(
            f"instances are for a {instances.image_size[0]}x{instances.image_size[1]} image, "
            f"the image is {height}x{width}"
        )
    instances = instances.to("cpu")
    keep = instances.scores >= threshold
    kept = instances[keep]
    order = kept.scores.argsort(descending=True)  # highest scores drawn first
    kept = kept[order]
    logger.debug("drawing %d of %d boxes (threshold %.2f)", len(kept), len(instances), threshold)
    visualizer = Visualizer(image_rgb, scale=scale)
    if len(kept) == 0:
        return visualizer.output.get_image()
    classes = kept.pred_classes.tolist()
    palette = colormap(rgb=True, maximum=1)
    out = visualizer.overlay_instances(
        boxes=kept.pred_boxes.tensor.numpy(),
        labels=grounding_labels(classes, kept.scores.tolist(), label_names, max_label_chars),
        assigned_colors=[palette[c % len(palette)] for c in classes],
    )
    return out.get_image()
