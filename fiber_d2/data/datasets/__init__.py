"""Dataset loaders and registrations; importing this package registers the standard sets."""

from .builtin import register_all_builtin, register_shapes
from .captions import load_captions, register_captions
from .detection import load_grounding_coco_json, mark_detection_dataset, register_grounding_coco
from .mdetr import load_mdetr_json, register_mdetr_grounding

__all__ = [
    "register_all_builtin",
    "register_shapes",
    "load_captions",
    "register_captions",
    "load_grounding_coco_json",
    "mark_detection_dataset",
    "register_grounding_coco",
    "load_mdetr_json",
    "register_mdetr_grounding",
]

register_all_builtin()
