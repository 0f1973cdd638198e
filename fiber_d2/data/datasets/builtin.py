"""Registration of the standard FIBER datasets at ``$DETECTRON2_DATASETS``-relative paths.

Nothing is read at import: only names, paths and metadata are registered.

==============================  ==========================================  ===============
name                            annotation file (under the datasets root)   evaluator_type
==============================  ==========================================  ===============
flickr30k_separateGT_{train,    mdetr_annotations/final_flickr_separateGT_  flickr
val,test}                       {split}.json; val / test evaluate against
                                flickr30k/flickr30k/{Annotations,Sentences}
                                when present (the Entities release)
refcoco_{train,val,testA,       mdetr_annotations/finetune_refcoco_         refexp
testB}, refcoco+_{...},         {split}.json (refcoco+ / refcocog alike)
refcocog_{train,val,test}
mixed_train_no_coco (GoldG)     mdetr_annotations/final_mixed_train_        flickr
                                no_coco.json
objects365_{train,val}          objects365/annotations/objects365_{split}   coco
                                .json
lvis_v1_minival, lvis_v1_       coco/annotations/lvis_v1_minival_inserted_  lvis
od_val (MDETR's LVIS subsets)   image_name.json, .../lvis_od_val.json
coco_caption_karpathy_{train,   coco/annotations/dataset_coco.json          retrieval
val,test}                       (Karpathy; train = train + val splits)
f30k_caption_karpathy_{train,   flickr30k/annotations/dataset_flickr30k     retrieval
val,test}                       .json (images: flickr30k/flickr30k-images)
shapes_{train,val}_{det,        the generated shapes world                  coco, flickr,
grounding,refexp,captions}                                                  refexp,
                                                                            retrieval
shapes_large_{train,val}_{...}  the same world with 2,048 training images   (as above)
==============================  ==========================================  ===============

detectron2's own COCO and LVIS registrations (``coco_2017_train``, ``lvis_v1_val``, ...) are
reused and marked as grounding data (:func:`mark_detection_dataset`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

from ...text import clean_name
from ..shapes import (
    CATEGORY_NAMES,
    SPLITS,
    ensure_shapes_world,
    shapes_files,
    shapes_root,
    shapes_root_in,
)
from .captions import register_captions
from .detection import mark_detection_dataset, register_grounding_coco
from .flickr_entities import entities_ground_truth, has_entities
from .mdetr import register_mdetr_grounding

__all__ = [
    "register_shapes",
    "register_flickr30k",
    "register_all_builtin",
    "SHAPES_LARGE_NUM_TRAIN",
]

SHAPES_LARGE_NUM_TRAIN = 2048

logger = logging.getLogger(__name__)

_MARKED_D2 = (
    "coco_2014_train",
    "coco_2014_val",
    "coco_2014_minival",
    "coco_2017_train",
    "coco_2017_val",
    "coco_2017_val_100",
    "lvis_v1_train",
    "lvis_v1_val",
)
_REFEXP_SPLITS = {
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),
}


@functools.lru_cache(maxsize=1)
def _lvis_prompts() -> dict[str, str]:
    """Prompts of the LVIS v1 categories whose detectron2 class name (the first synonym) is not
    the annotations' ``name``: the original prompts every LVIS category by its ``name`` (one
    category: 162, "bull", which detectron2 calls "horned_cow")."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return {
        c["synonyms"][0]: clean_name(c["name"])
        for c in LVIS_CATEGORIES
        if c["synonyms"][0] != c["name"]
    }


def register_flickr30k(root: str, prefix: str = "flickr30k_separateGT") -> None:
    """Register ``{prefix}_{train,val,test}``: MDETR's Flickr30k json under ``root``; the val and
    test phrases evaluate against the Entities files under ``root/flickr30k/flickr30k`` when there.

    Args:
        root: datasets root.
        prefix: name prefix.
    """
    entities = os.path.join(root, "flickr30k", "flickr30k")
    for split in ("train", "val", "test"):
        register_mdetr_grounding(
            f"{prefix}_{split}",
            os.path.join(root, "mdetr_annotations", f"final_flickr_separateGT_{split}.json"),
            os.path.join(root, "flickr30k", "flickr30k_images", split),
            "grounding",
            finish=None if split == "train" else functools.partial(_flickr_ground_truth, entities),
        )


def _flickr_ground_truth(root: str, records: list[dict]) -> list[dict]:
    """The Flickr30k evaluation sets' phrases with the Entities files' boxes and types, as the
    original evaluates (:mod:`.flickr_entities`); MDETR's when ``root`` lacks them."""
    if not has_entities(root):
        logger.warning(
            "Flickr30k Entities Annotations/ and Sentences/ not found under %s: phrase ground truth"
            " from MDETR's json (boxes of IoU >= 0.95 within a sentence kept once, phrase types"
            " 'unknown'); the original evaluates against the Entities files",
            root,
        )
        return records
    return entities_ground_truth(records, root)


def register_shapes(
    root: Optional[str] = None, prefix: str = "shapes", num_train: Optional[int] = None
) -> None:
    """Register the shapes world's datasets; the world is generated on first load.

    Names: ``{prefix}_{split}_det`` (COCO detection, evaluator "coco"),
    ``{prefix}_{split}_grounding`` (MDETR grounding, "flickr"), ``{prefix}_{split}_refexp``
    ("refexp"), ``{prefix}_{split}_captions`` ("retrieval"; train: one record per caption,
    val: one per image), for split in train/val.

    Args:
        root: world directory (default :func:`~fiber_d2.data.shapes.shapes_root`:
            ``$DETECTRON2_DATASETS/shapes`` when that variable is set, else
            ``$FIBER_D2_HOME/shapes``; resolved now).
        prefix: name prefix.
        num_train: training images of the world generated there (None: the default, 256).
    """
    root = str(shapes_root(root))
    kwargs = {} if num_train is None else {"num_train": num_train}
    prepare = functools.partial(ensure_shapes_world, root, **kwargs)
    thing_meta = {
        "thing_classes": list(CATEGORY_NAMES),
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(CATEGORY_NAMES))},
    }
    for split in SPLITS:
        files = shapes_files(root, split)
        image_root = files["image_root"]
        register_grounding_coco(
            f"{prefix}_{split}_det", files["det"], image_root, prepare=prepare, metadata=thing_meta
        )
        register_mdetr_grounding(
            f"{prefix}_{split}_grounding",
            files["grounding"],
            image_root,
            "grounding",
            prepare=prepare,
        )
        register_mdetr_grounding(
            f"{prefix}_{split}_refexp", files["refexp"], image_root, "refexp", prepare=prepare
        )
        register_captions(
            f"{prefix}_{split}_captions",
            files["captions"],
            image_root,
            one_per_caption=split == "train",
            prepare=prepare,
        )


def register_all_builtin(root: Optional[str] = None) -> None:
    """Register every standard dataset (see the module table) under ``root``.

    Args:
        root: datasets root (default ``$DETECTRON2_DATASETS`` or ``datasets``).
    """
    shapes_dir = str(shapes_root_in(root))
    root = root or os.getenv("DETECTRON2_DATASETS", "datasets")

    def p(*parts: str) -> str:
        return os.path.join(root, *parts)

    ann = p("mdetr_annotations")
    register_flickr30k(root)
    for dataset, splits in _REFEXP_SPLITS.items():
        for split in splits:
            register_mdetr_grounding(
                f"{dataset}_{split}",
                os.path.join(ann, f"finetune_{dataset}_{split}.json"),
                p("coco", "train2014"),
                "refexp",
            )
    register_mdetr_grounding(
        "mixed_train_no_coco",
        os.path.join(ann, "final_mixed_train_no_coco.json"),
        {"coco": p("coco", "train2014"), "*": p("gqa", "images")},
        "grounding",
    )
    for split in ("train", "val"):
        register_grounding_coco(
            f"objects365_{split}",
            p("objects365", "annotations", f"objects365_{split}.json"),
            p("objects365", split),
        )

    from detectron2.data.datasets.lvis import get_lvis_instances_meta, register_lvis_instances

    for name, file_name in (
        ("lvis_v1_minival", "lvis_v1_minival_inserted_image_name.json"),
        ("lvis_v1_od_val", "lvis_od_val.json"),
    ):
        register_lvis_instances(
            name, get_lvis_instances_meta(name), p("coco", "annotations", file_name), p("coco")
        )
    for name in _MARKED_D2 + ("lvis_v1_minival", "lvis_v1_od_val"):
        prompt = _lvis_prompts() if name.startswith("lvis_v1") else None
        if not mark_detection_dataset(name, prompt):
            logger.debug("detectron2 dataset %s is not registered; not marked", name)

    karpathy = p("coco", "annotations", "dataset_coco.json")
    for name, splits, per_caption in (
        ("coco_caption_karpathy_train", ("train", "val"), True),
        ("coco_caption_karpathy_val", ("val",), False),
        ("coco_caption_karpathy_test", ("test",), False),
    ):
        register_captions(name, karpathy, p("coco"), splits=splits, one_per_caption=per_caption)
    f30k = p("flickr30k", "annotations", "dataset_flickr30k.json")
    for name, splits, per_caption in (
        ("f30k_caption_karpathy_train", ("train", "val"), True),
        ("f30k_caption_karpathy_val", ("val",), False),
        ("f30k_caption_karpathy_test", ("test",), False),
    ):
        register_captions(
            name,
            f30k,
            p("flickr30k", "flickr30k-images"),
            splits=splits,
            one_per_caption=per_caption,
        )

    # generated data: $FIBER_D2_HOME/shapes unless a datasets root is given or set
    register_shapes(shapes_dir)
    # the same world with 2,048 training images (its first 256 and its val split are the default
    # world's): the image tower's supervised pre-training in projects/ImageTower
    large_dir = os.path.join(os.path.dirname(shapes_dir), "shapes_large")
    register_shapes(large_dir, prefix="shapes_large", num_train=SHAPES_LARGE_NUM_TRAIN)
