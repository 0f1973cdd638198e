"""Caption data for the Captioning project: the coarse stage's mapper without MLM fields, and the
training records with every reference caption of their image (for the CIDEr stage's rewards).

The datasets are fiber_d2's caption registrations (``coco_caption_karpathy_*``,
``f30k_caption_karpathy_*``, ``shapes_*_captions``): training sets give one record per caption,
evaluation sets one record per image with all its ``captions`` (the references).
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.data import get_detection_dataset_dicts

from fiber_d2.data.caption_mapper import CaptionDatasetMapper

from .cider import references_by_image

__all__ = ["attach_references", "build_caption_mapper", "caption_train_records"]


def build_caption_mapper(cfg: CfgNode, is_train: bool) -> CaptionDatasetMapper:
    """fiber_d2's caption mapper (square resize, ``input_ids``/``attention_mask`` of length
    ``MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN``) without MLM inputs."""
    kwargs = CaptionDatasetMapper.from_config(cfg, is_train)
    kwargs["mlm_probability"] = 0.0
    return CaptionDatasetMapper(**kwargs)


def attach_references(records: list[dict]) -> list[dict]:
    """Copies of the records with ``references``: every caption of the record's image."""
    refs = references_by_image(records)
    return [{**r, "references": refs[(r.get("dataset_name"), r["image_id"])]} for r in records]


def caption_train_records(cfg: CfgNode) -> list[dict]:
    """The training records of ``DATASETS.TRAIN``, with ``references`` for the CIDEr stage."""
    records = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    return attach_references(records) if cfg.CAPTION.STAGE == "cider" else records
