"""Dataset mappers: dataset records -> model inputs (image, tokens, positive maps, instances).

``GroundingDatasetMapper`` (fine-grained stage; detection, grounding and refexp records; the coarse
stage's ``CaptionDatasetMapper`` is in :mod:`.caption_mapper`; both read images through
:mod:`.reading` and count bad records with the counter below).
Both read the image, augment it, tokenize the text once per sample (padded to ``MAX_QUERY_LEN``).
In training a bad record is
skipped: a counted warning naming it and None, and detectron2's loader draws another one. At test
time a record is never replaced by another (that would evaluate one image twice and another never):
a bad record raises :class:`~fiber_d2.data.datasets.common.BadRecordError` naming it, except an
unreadable image with ``unreadable_as_empty`` (``TEST.UNREADABLE_IMAGE_AS_EMPTY``), which becomes a
black image flagged ``"unreadable": True``; evaluators count such an image with no predictions.

Output of ``GroundingDatasetMapper`` (the contract with the model and the evaluators):

* ``image``: uint8 Tensor (3, H, W) in ``INPUT.FORMAT``; ``height``/``width`` of the original
  image; ``image_id``, ``file_name``, ``task``, ``caption`` and the record's other fields
  (``phrases`` for grounding evaluation), ``annotations`` excepted;
* ``input_ids``, ``attention_mask``: LongTensor (T,), T = ``MAX_QUERY_LEN``;
* ``label_token_map``: BoolTensor (L, T), row l = tokens of label l (detection: L = number of
  classes, rows of classes absent from the prompt all False; grounding/refexp: L = phrases);
* chunked detection evaluation: ``input_ids``/``attention_mask`` (K, T), ``label_token_map``
  (K, L, T) and ``caption`` a list of K prompts;
* training: ``instances`` with ``gt_boxes`` (detectron2 xyxy, resized image), ``gt_classes``
  (contiguous category id, or phrase index) and ``gt_positive_map`` BoolTensor (G, T).

Test-time detection prompts depend only on the dataset, so they are tokenized once per dataset
and the same tensors are shared by every sample (treat them as read-only).
"""

from __future__ import annotations

import copy
import logging
import random
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from ..config import ConfigError
from ..text import (
    PromptEntry,
    build_detection_prompt,
    build_prompt,
    build_tokenizer,
    char_spans_to_positive_map,
    clean_name,
    prompt_token_lengths,
    tokenize,
)
from .prompts import encode_category_prompts, parse_caption_prompt
from .reading import (
    SkipRecord,
    evaluation_error,
    read_record_image,
    read_test_record_image,
    record_name,
)
from .resize import FIBERResizeShortestEdge

__all__ = [
    "GroundingDatasetMapper",
    "memoized",
]

logger = logging.getLogger(__name__)

_GROUNDING_TASKS = ("grounding", "refexp")


def memoized(cache: Optional[dict], key, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in ``cache`` under ``key`` and reused (``cache`` None: no memory): the
    input caches of the mappers whose mapping has no randomness. The value is shared: a caller that
    hands it on copies what may be modified."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def to_chw(image: np.ndarray) -> torch.Tensor:
    """An HWC uint8 array as the CHW tensor a model's ``"image"`` input holds."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


class BadRecordCounter:
    """Counts skipped records / dropped boxes of one mapper (per worker process)."""

    def __init__(self) -> None:
        self.skipped = 0
        self.dropped_boxes = 0
        self.cut_phrases = 0
        self.tokenless_phrases = 0
        self.cut_boxes = 0

    def skip(self, record: dict, reason: str) -> None:
        self.skipped += 1
        logger.warning(
            "skipping %s: %s (%d records skipped so far)",
            record_name(record),
            reason,
            self.skipped,
        )

    def _tally(self, counter: str, record: dict, count: int, what: str) -> None:
        """Add ``count`` to the counter ``counter`` and warn about ``record``."""
        setattr(self, counter, getattr(self, counter) + count)
        logger.warning("%s: %s (%d so far)", record_name(record), what, getattr(self, counter))

    def cut_off(self, record: dict, count: int, max_len: int) -> None:
        self._tally(
            "cut_phrases",
            record,
            count,
            f"{count} phrase(s) lie beyond the {max_len}-token prompt (MAX_QUERY_LEN) and have no "
            "token; they cannot be predicted",
        )

    def tokenless(self, record: dict, count: int) -> None:
        self._tally(
            "tokenless_phrases",
            record,
            count,
            f"{count} phrase(s) inside the prompt cover no token (only whitespace, or no span) and "
            "cannot be predicted",
        )

    def cut_off_boxes(self, record: dict, count: int, max_len: int) -> None:
        self._tally(
            "cut_boxes",
            record,
            count,
            f"{count} box(es) of categories past the {max_len}-token prompt (MAX_QUERY_LEN) have "
            "no token to learn",
        )

    def drop_boxes(self, record: dict, count: int) -> None:
        self._tally("dropped_boxes", record, count, f"dropped {count} empty box(es)")


class GroundingDatasetMapper:
    """Map detection / grounding / refexp records to FIBER's fine-grained inputs.

    Training detection records get the spec's OD -> grounding prompt (positive-overflow guard,
    sampled negatives, shuffling) or, with ``full_prompt_train``, all class names in a shuffled
    order; grounding/refexp records use their caption. Test detection prompts list all
    classes in contiguous-id order, or in chunks of ``chunk_size``.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: Sequence[Union[T.Augmentation, T.Transform]],
        tokenizer,
        image_format: str = "BGR",
        max_query_len: int = 256,
        separator: str = ". ",
        random_sample_neg: int = 85,
        control_prob: Sequence[float] = (0.0, 0.0, 1.0, 0.0),
        shuffle_prompt: bool = True,
        full_prompt_train: bool = False,
        chunk_size: int = -1,
        category_names: Optional[Mapping[str, Sequence[str]]] = None,
        default_dataset: Optional[str] = None,
        test_prompt: Sequence[str] = (),
        caption_prompt: Sequence[Tuple[str, str, str]] = (),
        no_flip_tasks: Sequence[str] = ("refexp",),
        unreadable_as_empty: bool = False,
        exif_orientation: bool = False,
    ):
        """
        Args:
            is_train: training (sampled prompts, instances) or inference behaviour.
            augmentations: detectron2 augmentations (resize, flip) applied to image and boxes.
            tokenizer: a fast tokenizer, or a name for :func:`fiber_d2.text.build_tokenizer`.
            image_format: ``INPUT.FORMAT`` of the output image ("BGR" or "RGB").
            max_query_len: padded token length T.
            separator: joins category names in prompts.
            random_sample_neg: negatives of the "full" control option (85).
            control_prob: ``DATASETS.CONTROL_PROB`` (p1, p2, p3, p4).
            shuffle_prompt: shuffle training prompts (not ``DATASETS.DISABLE_SHUFFLE``).
            full_prompt_train: all class names in every training prompt (COCO fine-tuning).
            chunk_size: test prompt chunk size (``TEST.CHUNKED_EVALUATION``); <= 0: one prompt.
            category_names: dataset name -> prompt text per contiguous category id; datasets
                not listed are read from MetadataCatalog (``thing_classes`` cleaned, or
                ``category_prompts`` overrides).
            default_dataset: dataset used for records without a ``dataset_name`` field.
            test_prompt: optional prompt text per category replacing the names at test time.
            caption_prompt: ``DATASETS.CAPTION_PROMPT`` (:func:`~fiber_d2.data.prompts.parse_caption_prompt`): per
                category ``(prefix, name, suffix)`` in label order, replacing the names in
                training (full prompts in label order only, as the original) and at test time;
                only the name is the category's span.
            no_flip_tasks: tasks whose records are never flipped (captions with left/right).
            unreadable_as_empty: test time: an unreadable image is evaluated as an image without
                predictions instead of raising (see the module docstring).
            exif_orientation: turn images upright by their EXIF tag (``INPUT.EXIF_ORIENTATION``;
                see :func:`.reading.read_image_file`).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.augmentations_no_flip = T.AugmentationList(
            [a for a in augmentations if not isinstance(a, (T.RandomFlip, T.HFlipTransform))]
        )
        self.tokenizer = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.image_format = image_format
        self.max_query_len = max_query_len
        self.separator = separator
        self.random_sample_neg = random_sample_neg
        self.control_prob = tuple(control_prob)
        self.shuffle_prompt = shuffle_prompt
        self.full_prompt_train = full_prompt_train
        self.chunk_size = chunk_size
        self.default_dataset = default_dataset
        self.test_prompt = list(test_prompt)
        self.caption_prompt = [tuple(e) for e in caption_prompt]
        if self.caption_prompt and self.test_prompt:
            raise ConfigError("set DATASETS.CAPTION_PROMPT or DATASETS.TEST_PROMPT, not both")
        if self.caption_prompt and is_train and (shuffle_prompt or not full_prompt_train):
            raise ConfigError(
                "DATASETS.CAPTION_PROMPT in training needs DATASETS.FULL_PROMPT_TRAIN True and "
                "DATASETS.DISABLE_SHUFFLE True (every category, in label order, as the original)"
            )
        self.no_flip_tasks = tuple(no_flip_tasks)
        self.unreadable_as_empty = unreadable_as_empty
        self.exif_orientation = exif_orientation
        # None: the `random` module, which detectron2 seeds per data-loader worker (a module
        # attribute would make the mapper unpicklable); tests may set a random.Random.
        self.rng: Optional[random.Random] = None
        self._names: Dict[str, List[str]] = {k: list(v) for k, v in (category_names or {}).items()}
        self._lengths: Dict[str, List[int]] = {}
        self._test_inputs: Dict[str, dict] = {}
        self.bad = BadRecordCounter()
        mode = "training" if is_train else "inference"
        logger.info("GroundingDatasetMapper (%s): %s", mode, self.augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_names: Optional[Sequence[str]] = None):
        if dataset_names is None:
            dataset_names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        if is_train:
            augs = [
                FIBERResizeShortestEdge(
                    cfg.INPUT.MIN_SIZE_TRAIN,
                    cfg.INPUT.MAX_SIZE_TRAIN,
                    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
                )
            ]
            if cfg.INPUT.FLIP_PROB > 0:
                augs.append(T.RandomFlip(prob=cfg.INPUT.FLIP_PROB, horizontal=True))
        else:
            augs = [
                FIBERResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
            ]
        return {
            "is_train": is_train,
            "augmentations": augs,
            "tokenizer": build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER),
            "image_format": cfg.INPUT.FORMAT,
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            "separator": cfg.DATASETS.SEPARATION_TOKENS,
            "random_sample_neg": cfg.DATASETS.RANDOM_SAMPLE_NEG,
            "control_prob": tuple(cfg.DATASETS.CONTROL_PROB),
            "shuffle_prompt": not cfg.DATASETS.DISABLE_SHUFFLE,
            "full_prompt_train": cfg.DATASETS.FULL_PROMPT_TRAIN,
            "chunk_size": cfg.TEST.CHUNKED_EVALUATION,
            "default_dataset": dataset_names[0] if len(dataset_names) == 1 else None,
            "test_prompt": [] if is_train else list(cfg.DATASETS.TEST_PROMPT),
            "caption_prompt": parse_caption_prompt(cfg.DATASETS.CAPTION_PROMPT),
            "unreadable_as_empty": cfg.TEST.UNREADABLE_IMAGE_AS_EMPTY,
            "exif_orientation": cfg.INPUT.EXIF_ORIENTATION,
        }

    # ------------------------------------------------------------------ category names
    def prompt_entries(self, dataset_name: Optional[str]) -> List[PromptEntry]:
        """:meth:`category_names`, or with ``caption_prompt`` its ``(prefix, name, suffix)``
        entries: the name cleaned in training and as written at test time, as the original."""
        names = self.category_names(dataset_name)
        if not self.caption_prompt:
            return names
        if len(self.caption_prompt) != len(names):
            raise ConfigError(
                f"DATASETS.CAPTION_PROMPT has {len(self.caption_prompt)} entries, dataset "
                f"{dataset_name or self.default_dataset!r} has {len(names)} categories"
            )
        return [
            (prefix, clean_name(name) if self.is_train else name, suffix)
            for prefix, name, suffix in self.caption_prompt
        ]

    def category_names(self, dataset_name: Optional[str]) -> List[str]:
        """Prompt text per contiguous category id of a detection dataset.

        Args:
            dataset_name: registered dataset name (None: ``default_dataset``).

        Returns:
            list of L names (``test_prompt`` when given at test time).
        """
        name = dataset_name or self.default_dataset
        if name is None:
            raise KeyError("detection record without 'dataset_name' and no default dataset")
        if name not in self._names:
            meta = MetadataCatalog.get(name)
            classes = meta.get("thing_classes", None)
            if not classes:
                raise KeyError(f"dataset {name!r} has no thing_classes in MetadataCatalog")
            prompts = meta.get("category_prompts", None) or {}
            self._names[name] = [prompts.get(c, clean_name(c)) for c in classes]
        names = self._names[name]
        if not self.is_train and self.test_prompt:
            if len(self.test_prompt) != len(names):
                raise ConfigError(
                    f"DATASETS.TEST_PROMPT has {len(self.test_prompt)} entries, dataset {name!r} "
                    f"has {len(names)} categories"
                )
            return self.test_prompt
        return names

    def _name_lengths(self, name: Optional[str]) -> List[int]:
        key = name or self.default_dataset
        if key not in self._lengths:
            names = self.category_names(name)
            self._lengths[key] = prompt_token_lengths(self.tokenizer, names, self.separator)
        return self._lengths[key]

    # ------------------------------------------------------------------ boxes
    def _boxes(self, record: dict, annos: List[dict], image_hw, transforms) -> tuple:
        """Absolute xyxy boxes after clipping, empty-box removal and the transforms.

        The transforms move each box as the original moves its legacy box (x2 = x + w - 1): a
        resize scales it as it is, a flip mirrors it about ``W - 1`` (``W - x - 1``). The result
        is that legacy box given back in detectron2's convention (+1 on x2, y2), so
        ``FIBER.forward``'s ``- 1`` recovers the original's target exactly (scaling x + w instead
        would move x2 and y2 by ``scale - 1`` pixels).

        Returns:
            (boxes float32 array (N', 4) in the augmented image, kept indices into annos).
        """
        h, w = record["height"], record["width"]
        boxes = np.array(
            [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
            dtype=np.float32,
        ).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        # Spec 6.3: boxes empty in the legacy convention (x2 = x + w - 1 <= x1, i.e. at most one
        # pixel wide or tall after clipping) are removed, as the original loader did.
        keep = np.nonzero((boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1))[0]
        if len(keep) < len(annos):
            self.bad.drop_boxes(record, len(annos) - len(keep))
        boxes = boxes[keep]
        boxes[:, 2:] -= 1.0  # legacy
        for t in getattr(transforms, "transforms", [transforms]):
            boxes = t.apply_box(boxes)
            if isinstance(t, T.HFlipTransform):
                boxes[:, 0::2] -= 1.0
            elif isinstance(t, T.VFlipTransform):
                boxes[:, 1::2] -= 1.0
        boxes[:, 2:] += 1.0
        return boxes.astype(np.float32).reshape(-1, 4), keep.tolist()

    # ------------------------------------------------------------------ tasks
    def _detection_test(self, record: dict, out: dict) -> None:
        key = record.get("dataset_name") or self.default_dataset
        if key not in self._test_inputs:
            enc = encode_category_prompts(
                self.tokenizer,
                self.prompt_entries(key),
                max_query_len=self.max_query_len,
                separator=self.separator,
                chunk_size=self.chunk_size,
                squeeze=self.chunk_size <= 0,  # chunked evaluation keeps (K, T) even for K = 1
            )
            enc.pop("chunks")
            names = self.prompt_entries(key)
            reached = enc["label_token_map"].reshape(-1, len(names), self.max_query_len)
            lost = [i for i, hit in enumerate(reached.any(dim=2).any(dim=0).tolist()) if not hit]
            if lost:  # one prompt (TEST.CHUNKED_EVALUATION <= 0) longer than the text tower takes
                logger.warning(
                    "%s: %d of %d category names lie past the %d-token prompt (MAX_QUERY_LEN) and "
                    "are never predicted (first: %r); TEST.CHUNKED_EVALUATION (e.g. 40) splits "
                    "the names into prompts that fit",
                    key,
                    len(lost),
                    len(names),
                    self.max_query_len,
                    names[lost[0]],
                )
            self._test_inputs[key] = enc
        out.update(self._test_inputs[key])

    def _detection_train(self, record: dict, out: dict, image_hw, transforms) -> None:
        names = self.prompt_entries(record.get("dataset_name"))
        annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        for a in annos:
            if not 0 <= a["category_id"] < len(names):
                raise SkipRecord(f"category_id {a['category_id']} outside [0, {len(names)})")
        boxes, keep = self._boxes(record, annos, image_hw, transforms)
        classes = [annos[i]["category_id"] for i in keep]
        if self.full_prompt_train:
            order = list(range(len(names)))
            if self.shuffle_prompt:
                (self.rng or random).shuffle(order)
            caption, spans = build_prompt([names[c] for c in order], self.separator)
            spans_by_id = dict(zip(order, spans))
        else:
            caption, spans_by_id, _ = build_detection_prompt(
                classes,
                names,
                self.rng or random,
                random_sample_neg=self.random_sample_neg,
                control_prob=self.control_prob,
                max_tokens=self.max_query_len - 2,
                shuffle=self.shuffle_prompt,
                name_token_lengths=self._name_lengths(record.get("dataset_name")),
                separator=self.separator,
            )
        enc = tokenize(self.tokenizer, caption, self.max_query_len)
        label_map = torch.zeros(len(names), self.max_query_len, dtype=torch.bool)
        ids = list(spans_by_id)
        if ids:
            rows = char_spans_to_positive_map(
                enc, [[spans_by_id[c]] for c in ids], self.max_query_len
            )
            label_map[ids] = rows
        present = [i for i, c in enumerate(classes) if c in spans_by_id]  # overflow guard drops
        gt_classes = torch.tensor([classes[i] for i in present], dtype=torch.long)
        cut = int((~label_map[gt_classes].any(dim=1)).sum()) if len(present) else 0
        if cut:  # the full prompt (FULL_PROMPT_TRAIN) longer than the text tower takes
            self.bad.cut_off_boxes(record, cut, self.max_query_len)
        instances = Instances(image_hw)
        instances.gt_boxes = Boxes(torch.as_tensor(boxes[present]).reshape(-1, 4))
        instances.gt_classes = gt_classes
        instances.gt_positive_map = label_map[gt_classes]
        out.update(
            caption=caption,
            input_ids=enc["input_ids"][0],
            attention_mask=enc["attention_mask"][0],
            label_token_map=label_map,
            instances=instances,
        )

    def _grounding(self, record: dict, out: dict, image_hw, transforms) -> None:
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise SkipRecord("empty caption")
        phrases = record.get("phrases") or []
        enc = tokenize(self.tokenizer, caption, self.max_query_len)
        label_map = char_spans_to_positive_map(
            enc, [p["tokens_positive"] for p in phrases], self.max_query_len
        )
        empty = (~label_map.any(dim=1)).nonzero().flatten().tolist() if len(phrases) else []
        if empty:
            # spans inside the caption but past the truncated prompt (spec 3.4 skips them), or
            # spans that cover no token inside it
            kept_end = int(enc["offset_mapping"][0, :, 1].max())
            starts = [min((s[0] for s in phrases[i]["tokens_positive"]), default=-1) for i in empty]
            cut = sum(1 for start in starts if start >= kept_end)
            if cut:
                self.bad.cut_off(record, cut, self.max_query_len)
            if len(empty) > cut:
                self.bad.tokenless(record, len(empty) - cut)
        out.update(
            caption=caption,
            input_ids=enc["input_ids"][0],
            attention_mask=enc["attention_mask"][0],
            label_token_map=label_map,
        )
        if not self.is_train:
            return
        annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        for a in annos:
            if not 0 <= a["phrase_index"] < len(phrases):
                raise SkipRecord(f"phrase_index {a['phrase_index']} outside [0, {len(phrases)})")
        positive = char_spans_to_positive_map(
            enc, [a["tokens_positive"] for a in annos], self.max_query_len
        )
        boxes, keep = self._boxes(record, annos, image_hw, transforms)
        instances = Instances(image_hw)
        instances.gt_boxes = Boxes(torch.as_tensor(boxes).reshape(-1, 4))
        instances.gt_classes = torch.tensor(
            [annos[i]["phrase_index"] for i in keep], dtype=torch.long
        )
        instances.gt_positive_map = positive[keep]
        out["instances"] = instances

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        """Map one record (see the module docstring).

        Args:
            dataset_dict: a detection, grounding or refexp record.

        Returns:
            the model input dict; in training None for a bad record (skipped with a warning).

        Raises:
            BadRecordError: at test time, a record that cannot be evaluated.
        """
        record = copy.copy(dataset_dict)
        task = record.get("task", "detection")
        try:
            if task != "detection" and task not in _GROUNDING_TASKS:
                raise SkipRecord(f"task {task!r} is not handled by GroundingDatasetMapper")
            if self.is_train:
                image = read_record_image(record, self.image_format, self.exif_orientation)
            else:
                image = read_test_record_image(
                    record, self.image_format, self.unreadable_as_empty, self.exif_orientation
                )
            record.setdefault("height", image.shape[0])
            record.setdefault("width", image.shape[1])
            augs = self.augmentations_no_flip if task in self.no_flip_tasks else self.augmentations
            aug_input = T.AugInput(image)
            transforms = augs(aug_input)
            image_hw = aug_input.image.shape[:2]
            out = {k: v for k, v in record.items() if k != "annotations"}
            out.update(image=to_chw(aug_input.image), task=task)
            if task == "detection":
                if self.is_train:
                    self._detection_train(record, out, image_hw, transforms)
                else:
                    self._detection_test(record, out)
            else:
                self._grounding(record, out, image_hw, transforms)
        except (SkipRecord, ValueError, KeyError, IndexError) as e:
            if not self.is_train:
                raise evaluation_error(record, e) from None
            self.bad.skip(record, str(e))
            return None
        return out
