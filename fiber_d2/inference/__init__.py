"""The pieces of :class:`fiber_d2.predictor.FIBERPredictor` as plain functions: prompts to text
inputs (:mod:`.prompts`), image inputs to arrays (:mod:`.images`), detections to the returned
selection and COCO records (:mod:`.outputs`)."""

from .images import ImageLike, image_to_array
from .outputs import check_selection, check_threshold, nms_keep, select_detections, to_coco_json
from .prompts import encode_caption, encode_names, phrase_spans, prompt_key, split_prompt

__all__ = [
    "ImageLike",
    "check_selection",
    "check_threshold",
    "encode_caption",
    "encode_names",
    "image_to_array",
    "nms_keep",
    "phrase_spans",
    "prompt_key",
    "select_detections",
    "split_prompt",
    "to_coco_json",
]
