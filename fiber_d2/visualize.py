"""Drawing grounding / detection predictions with detectron2's ``Visualizer``.

Boxes are labelled with the phrase or category name of their label and the score; each label keeps one
colour (detectron2's colormap, indexed by label), so the boxes of one phrase match. Readable at any
input size:

* small images are upscaled (shorter side at least ``min_size``, 512 by default, longer side at most
  :data:`MAX_DRAWN_SIDE`) before drawing, so the text is not larger than the picture;
* labels are placed greedily in score order (above the box, inside its top, below it, then moved down)
  so that the labels of overlapping boxes do not cover each other, and are kept inside the image;
* :func:`side_by_side` puts the ground truth and the prediction next to each other under titles.

Used by ``tools/demo.py``, :meth:`fiber_d2.FIBERPredictor.draw`, ``tools/web_demo.py`` and the
``make demo`` pipeline's prediction images.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
from detectron2.structures import Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer
from PIL import Image, ImageDraw, ImageFont

__all__ = ["grounding_labels", "draw_grounding", "draw_boxes", "side_by_side", "upscale_factor"]

logger = logging.getLogger(__name__)

Rect = Tuple[float, float, float, float]


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


# Longest side of an upscaled drawing (automatic, or asked for with --scale): a 1 x 300 image with
# its shorter side brought to 512 is a 512 x 153,600 canvas, which took minutes to draw.
MAX_DRAWN_SIDE = 4096


def upscale_factor(height: int, width: int, min_size: int) -> float:
    """Factor >= 1 that brings the shorter side to ``min_size`` (1 when already there), at most
    the factor that brings the longer side to :data:`MAX_DRAWN_SIDE`."""
    short, long = min(height, width), max(height, width)
    if short <= 0 or min_size <= 0:
        return 1.0
    return max(1.0, min(float(min_size) / short, MAX_DRAWN_SIDE / long))


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_labels(
    boxes: np.ndarray, sizes: Sequence[Tuple[float, float]], height: int, width: int
) -> List[Tuple[float, float]]:
    """Top-left corners of label rectangles (w, h) that avoid the labels placed before them.

    Candidates per box, in order: just above it, inside its top edge, just below it; then each of
    them moved down one label height at a time. The first free one wins; if none is, the least
    overlapping candidate is taken. Everything is clipped to the image.
    """
    placed: List[Rect] = []
    corners = []
    for (x1, y1, _x2, y2), (w, h) in zip(boxes, sizes):
        x = float(min(max(x1, 0.0), max(width - w, 0.0)))
        starts = [y1 - h, y1, y2]
        candidates = [s + k * h for k in range(0, 12) for s in starts]
        best, best_hits = None, None
        for y in candidates:
            y = float(min(max(y, 0.0), max(height - h, 0.0)))
            rect = (x, y, x + w, y + h)
            hits = sum(_overlap(rect, p) for p in placed)
            if best_hits is None or hits < best_hits:
                best, best_hits = rect, hits
            if hits == 0:
                break
        placed.append(best)
        corners.append((best[0], best[1]))
    return corners


def draw_boxes(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    texts: Sequence[str],
    colors: Sequence,
    *,
    min_size: int = 512,
) -> np.ndarray:
    """Draw labelled boxes with non-overlapping labels on an (upscaled) copy of the image.

    Args:
        image_rgb: uint8 array (H, W, 3), RGB.
        boxes: float array (N, 4), xyxy in ``image_rgb``'s frame, in drawing order (first drawn
            first and labelled first).
        texts: N labels.
        colors: N RGB colours in [0, 1].
        min_size: the shorter side of the output is at least this (upscaled when smaller).

    Returns:
        uint8 RGB array (H * f, W * f, 3), f = :func:`upscale_factor`.
    """
    factor = upscale_factor(image_rgb.shape[0], image_rgb.shape[1], min_size)
    if factor > 1.0:
        size = (round(image_rgb.shape[1] * factor), round(image_rgb.shape[0] * factor))
        image_rgb = np.asarray(Image.fromarray(image_rgb).resize(size, Image.BICUBIC))
    height, width = image_rgb.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * factor
    visualizer = Visualizer(image_rgb, scale=1.0)
    # A font that stays readable on the output: ~1/40 of the shorter side, at least 11 px.
    font = max(11.0, min(height, width) / 40.0)
    char_w, line_h = 0.62 * font * 1.39, font * 1.39 + 4.0
    sizes = [(len(t) * char_w + 6.0, line_h) for t in texts]
    for box, color in zip(boxes, colors):
        visualizer.draw_box(box, edge_color=color, alpha=1.0)
    for (x, y), text, color in zip(_place_labels(boxes, sizes, height, width), texts, colors):
        visualizer.draw_text(
            text,
            (x + 2.0, y + 1.0),
            font_size=font,
            color="white",
            horizontal_alignment="left",
        )
        visualizer.output.ax.texts[-1].set_bbox(
            {"facecolor": color, "alpha": 0.85, "pad": 1.5, "edgecolor": "none"}
        )
    return visualizer.output.get_image()


def draw_grounding(
    image_rgb: np.ndarray,
    instances: Instances,
    label_names: Sequence[str],
    threshold: float = 0.3,
    *,
    max_label_chars: int = 40,
    min_size: int = 512,
    scale: Optional[float] = None,
) -> np.ndarray:
    """Draw the boxes scoring at least ``threshold`` on a copy of the image.

    Args:
        image_rgb: uint8 array (H, W, 3) in RGB order, the image the predictions refer to.
        instances: predictions with ``pred_boxes`` (xyxy in ``image_rgb``'s frame), ``scores``
            and ``pred_classes`` (index into ``label_names``); any device.
        label_names: L phrase / category names.
        threshold: minimum score of a drawn box.
        max_label_chars: longer names are shortened in the drawing.
        min_size: small images are upscaled so their shorter side is at least this (0: never).
        scale: an explicit output size factor instead (``--scale`` of tools/demo.py). Without it, an
            image larger than :data:`MAX_DRAWN_SIDE` a side is drawn scaled down to it (drawing a
            6000 x 5800 photo at full size took 5 GB).

    Returns:
        uint8 RGB array, the image (upscaled, see ``min_size``) with labelled boxes.

    Raises:
        ValueError: a wrong image shape, or instances of a different image size.
    """
    image_rgb = np.ascontiguousarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image_rgb must be (H, W, 3), got {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    if tuple(instances.image_size) != (height, width):
        raise ValueError(
            f"instances are for a {instances.image_size[0]}x{instances.image_size[1]} image, "
            f"the image is {height}x{width}"
        )
    if scale is None and max(height, width) > MAX_DRAWN_SIDE:
        scale = MAX_DRAWN_SIDE / max(height, width)
    if scale is not None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if scale > 1.0 and max(height, width) * scale > MAX_DRAWN_SIDE:
            raise ValueError(
                f"scale {scale} would draw the {height}x{width} image at "
                f"{round(height * scale)}x{round(width * scale)}; at most {MAX_DRAWN_SIDE} px a side"
            )
        min_size = round(min(height, width) * scale)
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(image_rgb).resize(size, Image.BILINEAR))
            instances = instances.to("cpu")
            inst = Instances(small.shape[:2], **instances.get_fields())
            inst.pred_boxes = inst.pred_boxes.clone()
            inst.pred_boxes.scale(size[0] / width, size[1] / height)
            return draw_grounding(
                small, inst, label_names, threshold, max_label_chars=max_label_chars, min_size=0
            )
    instances = instances.to("cpu")
    kept = instances[instances.scores >= threshold]
    kept = kept[kept.scores.argsort(descending=True)]  # highest scores drawn and labelled first
    logger.debug("drawing %d of %d boxes (threshold %.2f)", len(kept), len(instances), threshold)
    classes = kept.pred_classes.tolist()
    palette = colormap(rgb=True, maximum=1)
    return draw_boxes(
        image_rgb,
        kept.pred_boxes.tensor.numpy(),
        grounding_labels(classes, kept.scores.tolist(), label_names, max_label_chars),
        [palette[c % len(palette)] for c in classes],
        min_size=min_size,
    )


def side_by_side(
    images: Sequence[np.ndarray], titles: Sequence[str], *, gap: int = 8
) -> np.ndarray:
    """Put RGB images next to each other, each under its title (e.g. "ground truth", "prediction").

    Args:
        images: uint8 RGB arrays (H_i, W_i, 3); shorter ones are padded at the bottom (white).
        titles: one title per image.
        gap: white columns between images.

    Returns:
        uint8 RGB array.
    """
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images need {len(images)} titles, got {len(titles)}")
    height = max(im.shape[0] for im in images)
    band = max(24, height // 16)
    try:
        font = ImageFont.load_default(size=int(band * 0.7))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    columns = []
    for k, (im, title) in enumerate(zip(images, titles)):
        panel = Image.new("RGB", (im.shape[1], height + band), "white")
        panel.paste(Image.fromarray(np.ascontiguousarray(im)), (0, band))
        ImageDraw.Draw(panel).text((6, band * 0.12), title, fill=(0, 0, 0), font=font)
        columns.append(np.asarray(panel))
        if k + 1 < len(images):
            columns.append(np.full((height + band, gap, 3), 255, np.uint8))
    return np.concatenate(columns, axis=1)
