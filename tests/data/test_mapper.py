"""Tests of GroundingDatasetMapper and CaptionDatasetMapper: output contract, box alignment
after resize and flip, prompts, positive maps and bad-record handling."""

import logging
import pickle
import random

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from fiber_d2.config import ConfigError, add_fiber_config
from fiber_d2.data.caption_mapper import CaptionDatasetMapper
from fiber_d2.data.datasets.common import BadRecordError
from fiber_d2.data.mapper import GroundingDatasetMapper
from fiber_d2.data.prompts import parse_caption_prompt
from fiber_d2.text import prompt_token_lengths

T_LEN = 32
NAMES = ["red box", "blue box", "green box", "yellow box", "pink box"]
RGB = {"red": (255, 0, 0), "blue": (0, 0, 255), "gray": (128, 128, 128)}


def make_image(path, width=60, height=40, boxes=()):
    """Gray image with filled rectangles; boxes are (colour, x, y, w, h) in pixels."""
    pixels = np.full((height, width, 3), RGB["gray"], dtype=np.uint8)
    for colour, x, y, w, h in boxes:
        pixels[y : y + h, x : x + w] = RGB[colour]
    Image.fromarray(pixels).save(path)
    return str(path)


def det_record(path, dataset_name="toy"):
    return {
        "file_name": path,
        "height": 40,
        "width": 60,
        "image_id": 3,
        "task": "detection",
        "dataset_name": dataset_name,
        "annotations": [
            {"bbox": [10, 5, 20, 15], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
            {"bbox": [0, 0, 60, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2,
             "iscrowd": 1},
            {"bbox": [35, 20, 15, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},
            {"bbox": [5, 5, 0.5, 8], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3},
        ],
    }  # fmt: skip


@pytest.fixture
def det_image(tmp_path):
    return make_image(
        tmp_path / "det.png", boxes=[("red", 10, 5, 20, 15), ("blue", 35, 20, 15, 10)]
    )


def mapper(tok, is_train=True, flip=1.0, **kwargs):
    augs = [T.ResizeShortestEdge((80,), 1000, "choice")]
    if flip:
        augs.append(T.RandomFlip(prob=flip))
    kwargs.setdefault("category_names", {"toy": NAMES})
    kwargs.setdefault("control_prob", (0.0, 1.0, 0.0, 0.0))  # no negatives
    kwargs.setdefault("max_query_len", T_LEN)
    return GroundingDatasetMapper(is_train=is_train, augmentations=augs, tokenizer=tok, **kwargs)


def decode_row(tok, input_ids, row):
    return tok.decode(input_ids[row].tolist()).strip()


def test_detection_train_contract_and_alignment(shapes_tokenizer, det_image, caplog):
    tok = shapes_tokenizer
    m = mapper(tok)
    with caplog.at_level(logging.WARNING, logger="fiber_d2.data.mapper"):
        out = m(det_record(det_image))
    assert "dropped 1 empty box" in caplog.text
    image = out["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 80, 120)
    assert (out["height"], out["width"], out["image_id"], out["task"]) == (40, 60, 3, "detection")
    assert out["input_ids"].shape == (T_LEN,) and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].shape == (T_LEN,) and out["attention_mask"].dtype == torch.long
    assert "annotations" not in out
    inst = out["instances"]
    assert inst.image_size == (80, 120)
    assert inst.gt_classes.tolist() == [0, 1]  # crowd and degenerate boxes removed
    # moved as the original moves the legacy box (x2 = x + w - 1): scaled by 2, then mirrored in
    # the 120-px wide image (x -> 120 - x - 1), given back with +1 on x2, y2: the detectron2 box
    # (x1, y1, x2, y2) becomes (2 x1, 2 y1, 2 x2 - 1, 2 y2 - 1) before the flip
    expected = torch.tensor([[120 - 59, 10, 120 - 20, 39], [120 - 99, 40, 120 - 70, 59]])
    assert torch.allclose(inst.gt_boxes.tensor, expected.float())
    hwc = image.permute(1, 2, 0).numpy()  # BGR
    for (x1, y1, x2, y2), colour in zip(expected.tolist(), ("red", "blue")):
        inner = hwc[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].reshape(-1, 3)
        assert (inner == RGB[colour][::-1]).all()
    # prompt: exactly the two positives; label rows decode to the names
    assert sorted(out["caption"].split(". ")) == ["blue box", "red box"]
    label_map = out["label_token_map"]
    assert label_map.dtype == torch.bool and label_map.shape == (len(NAMES), T_LEN)
    assert decode_row(tok, out["input_ids"], label_map[0]) == "red box"
    assert decode_row(tok, out["input_ids"], label_map[1]) == "blue box"
    assert not label_map[2:].any()
    assert inst.gt_positive_map.dtype == torch.bool
    assert torch.equal(inst.gt_positive_map, label_map[inst.gt_classes])
    assert not (label_map & (out["attention_mask"] == 0)).any()


def test_detection_train_negatives_and_full_prompt(shapes_tokenizer, det_image):
    m = mapper(shapes_tokenizer, control_prob=(0, 0, 1, 0), random_sample_neg=85, max_query_len=64)
    m.rng = random.Random(0)
    out = m(det_record(det_image))
    assert sorted(out["caption"].split(". ")) == sorted(NAMES)  # all classes fit
    assert out["label_token_map"].any(-1).all()
    m = mapper(shapes_tokenizer, full_prompt_train=True, shuffle_prompt=False)
    out = m(det_record(det_image))
    assert out["caption"] == ". ".join(NAMES)
    # a budget too small for both positives keeps one; the other's box is dropped
    lengths = prompt_token_lengths(shapes_tokenizer, NAMES[:2])
    assert max(lengths) < sum(lengths)
    m = mapper(shapes_tokenizer, max_query_len=max(lengths) + 2)
    out = m(det_record(det_image))
    assert len(out["instances"]) == 1 and out["caption"] in ("red box", "blue box")


def test_detection_test_prompts(shapes_tokenizer, det_image):
    tok = shapes_tokenizer
    out = mapper(tok, is_train=False, flip=0)(det_record(det_image))
    assert "instances" not in out and out["image"].shape == (3, 80, 120)
    assert out["caption"] == ". ".join(NAMES)
    for label, name in enumerate(NAMES):
        assert decode_row(tok, out["input_ids"], out["label_token_map"][label]) == name
    out = mapper(tok, is_train=False, flip=0, chunk_size=2)(det_record(det_image))
    assert out["input_ids"].shape == (3, T_LEN) and out["attention_mask"].shape == (3, T_LEN)
    assert out["label_token_map"].shape == (3, len(NAMES), T_LEN)
    assert out["caption"] == ["red box. blue box", "green box. yellow box", "pink box"]
    present = out["label_token_map"].any(-1)  # (K, L)
    assert present.sum(0).tolist() == [1] * len(NAMES)
    for label, name in enumerate(NAMES):
        k = int(present[:, label].nonzero())
        assert decode_row(tok, out["input_ids"][k], out["label_token_map"][k, label]) == name
    over = mapper(tok, is_train=False, flip=0, test_prompt=["a", "b", "c", "d", "e"])
    assert over(det_record(det_image))["caption"] == "a. b. c. d. e"


def grounding_record(path, task="grounding"):
    caption = "a red box left of a blue box"
    red, blue = [0, 9], [18, 28]
    return {
        "file_name": path,
        "height": 40,
        "width": 60,
        "image_id": 5,
        "original_image_id": 1,
        "caption": caption,
        "task": task,
        "annotations": [
            {"bbox": [10, 5, 20, 15], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
             "phrase_index": 1, "tokens_positive": [blue], "iscrowd": 0},
            {"bbox": [35, 20, 15, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
             "phrase_index": 0, "tokens_positive": [red], "iscrowd": 0},
        ],
        "phrases": [
            {"text": "a red box", "tokens_positive": [red], "boxes": [[35, 20, 50, 30]],
             "phrase_type": "unknown"},
            {"text": "a blue box", "tokens_positive": [blue], "boxes": [[10, 5, 30, 20]],
             "phrase_type": "unknown"},
        ],
    }  # fmt: skip


def test_grounding_train_and_test(shapes_tokenizer, det_image):
    tok = shapes_tokenizer
    out = mapper(tok, flip=0)(grounding_record(det_image))
    assert out["caption"] == "a red box left of a blue box" and out["task"] == "grounding"
    label_map = out["label_token_map"]
    assert label_map.shape == (2, T_LEN)
    assert [decode_row(tok, out["input_ids"], r) for r in label_map] == ["a red box", "a blue box"]
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [1, 0]
    assert torch.equal(inst.gt_positive_map, label_map[[1, 0]])
    assert torch.allclose(
        inst.gt_boxes.tensor, torch.tensor([[20.0, 10, 59, 39], [70, 40, 99, 59]])
    )
    out = mapper(tok, is_train=False, flip=0)(grounding_record(det_image))
    assert "instances" not in out and out["phrases"][1]["boxes"] == [[10, 5, 30, 20]]
    assert out["label_token_map"].shape == (2, T_LEN)


def test_grounding_drops_crowd_and_empty_boxes_with_their_positive_maps(
    shapes_tokenizer, det_image
):
    record = grounding_record(det_image)
    red, blue = record["annotations"][1], record["annotations"][0]
    empty = dict(red, bbox=[5, 5, 0.5, 8])  # red's phrase, at most one pixel wide: removed
    crowd = dict(red, iscrowd=1)
    record["annotations"] = [crowd, empty, blue, red]
    out = mapper(shapes_tokenizer, flip=0)(record)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [1, 0]
    # each kept box keeps its own phrase's tokens
    assert torch.equal(inst.gt_positive_map, out["label_token_map"][[1, 0]])


def test_detection_boxes_are_clipped_to_the_image(shapes_tokenizer, det_image):
    record = det_record(det_image)
    # 10 px above and 25 px below the 40-px high image: clipped to rows 0..40
    record["annotations"] = [
        {"bbox": [10, -10, 20, 75], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    ]
    out = mapper(shapes_tokenizer, flip=0)(record)
    # clipped to x + w <= 30 (legacy x2 29), y2 <= 40 (39); the legacy box resized by 2, then + 1
    expected = torch.tensor([[20.0, 0, 59, 79]])
    assert torch.allclose(out["instances"].gt_boxes.tensor, expected)


def test_detection_prompt_budget_leaves_room_for_the_specials(shapes_tokenizer, det_image):
    """Spec 4.4: the positives' running length may reach MAX_QUERY_LEN - 2 (254 of 256), the
    two specials' room, not more."""
    lengths = prompt_token_lengths(shapes_tokenizer, NAMES[:2])
    for max_query_len, boxes in ((sum(lengths) + 1, 1), (sum(lengths) + 2, 2)):
        m = mapper(shapes_tokenizer, flip=0, max_query_len=max_query_len)
        assert len(m(det_record(det_image))["instances"]) == boxes


def test_full_prompt_is_shuffled_when_asked(shapes_tokenizer, det_image):
    m = mapper(shapes_tokenizer, full_prompt_train=True, shuffle_prompt=True)
    m.rng = random.Random(0)
    captions = {m(det_record(det_image))["caption"] for _ in range(6)}
    assert len(captions) > 1
    assert all(sorted(c.split(". ")) == sorted(NAMES) for c in captions)


def test_refexp_is_never_flipped(shapes_tokenizer, det_image):
    out = mapper(shapes_tokenizer, flip=1.0)(grounding_record(det_image, task="refexp"))
    assert torch.allclose(out["instances"].gt_boxes.tensor[0], torch.tensor([20.0, 10, 59, 39]))
    out = mapper(shapes_tokenizer, flip=1.0)(grounding_record(det_image))
    # flipped: the legacy (20, 10, 58, 38) mirrored about 119 is (61, 10, 99, 38), + 1
    assert torch.allclose(out["instances"].gt_boxes.tensor[0], torch.tensor([61.0, 10, 100, 39]))


def test_bad_records_are_skipped(shapes_tokenizer, det_image, tmp_path, caplog):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    bad_span = grounding_record(det_image)
    bad_span["phrases"][0]["tokens_positive"] = [[20, 99]]
    wrong_size = dict(det_record(det_image), width=61)
    bad_records = [
        det_record(str(tmp_path / "missing.jpg")),
        det_record(str(corrupt)),
        wrong_size,
        bad_span,
        dict(det_record(det_image), task="vqa"),
        dict(det_record(det_image), dataset_name="unregistered_dataset_xyz"),
    ]
    m = mapper(shapes_tokenizer)
    with caplog.at_level(logging.WARNING, logger="fiber_d2.data.mapper"):
        results = [m(r) for r in bad_records]
    assert results == [None] * len(bad_records)
    assert m.bad.skipped == len(bad_records)
    for needle in ("missing.jpg", "corrupt.jpg", "61", "outside the caption", "vqa", "xyz"):
        assert needle in caplog.text
    assert m(det_record(det_image)) is not None  # the mapper keeps working


def test_from_config_pickle_and_loader(shapes_tokenizer_dir, det_image, tmp_path):
    cfg = add_fiber_config(get_cfg())
    cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER = str(shapes_tokenizer_dir)
    cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN = T_LEN
    cfg.INPUT.MIN_SIZE_TRAIN = (48,)
    cfg.INPUT.MAX_SIZE_TRAIN = 100
    cfg.DATASETS.TRAIN = ("toy_det",)
    m = GroundingDatasetMapper(cfg, is_train=True, dataset_names=["toy_det"])
    m = pickle.loads(pickle.dumps(m))  # data-loader workers receive a pickled mapper
    m._names["toy_det"] = NAMES
    good = det_record(det_image, "toy_det")
    records = [good, det_record(str(tmp_path / "gone.png"), "toy_det")]
    loader = build_detection_train_loader(
        dataset=records, mapper=m, total_batch_size=2, num_workers=0, aspect_ratio_grouping=False
    )
    batch = next(iter(loader))
    assert len(batch) == 2 and all(x["file_name"] == det_image for x in batch)
    assert batch[0]["image"].shape[1] == 48 and batch[0]["input_ids"].shape == (T_LEN,)


def test_caption_mapper(shapes_tokenizer, det_image, tmp_path):
    tok = shapes_tokenizer
    m = CaptionDatasetMapper(is_train=True, image_size=24, tokenizer=tok, max_query_len=16)
    m.generator = torch.Generator().manual_seed(0)
    record = {"file_name": det_image, "image_id": 1, "caption": "a red box", "task": "caption"}
    out = m(record)
    assert out["image"].shape == (3, 24, 24) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (40, 60)
    assert out["input_ids"].shape == (16,) and out["mlm_input_ids"].shape == (16,)
    labels = out["mlm_labels"]
    selected = labels != -100
    assert torch.equal(labels[selected], out["input_ids"][selected])
    specials = torch.isin(out["input_ids"], torch.tensor(tok.all_special_ids))
    assert not (selected & specials).any()
    assert torch.equal(out["mlm_input_ids"][~selected], out["input_ids"][~selected])
    evaluation = CaptionDatasetMapper(
        is_train=False, image_size=24, tokenizer=tok, max_query_len=16
    )
    out = evaluation(
        {"file_name": det_image, "image_id": 1, "captions": ["a red box", "two boxes"]}
    )
    assert out["input_ids"].shape == (2, 16) and "mlm_input_ids" not in out
    assert tok.decode(out["input_ids"][1], skip_special_tokens=True) == "two boxes"
    # at test time a bad record is an error naming it, never a skipped (substituted) record
    with pytest.raises(BadRecordError, match="empty caption"):
        evaluation({"file_name": det_image, "caption": " "})
    with pytest.raises(BadRecordError, match="nope.png"):
        evaluation({"file_name": str(tmp_path / "nope.png"), "caption": "x"})
    assert evaluation.bad.skipped == 0


def test_caption_mapper_albef_randaug_in_training_only(shapes_tokenizer, det_image):
    """INPUT.VL_TRAIN_TRANSFORM "albef_randaug" (retrieval / captioning fine-tuning, spec §5.2):
    training images are random crops with RandAugment, evaluation keeps the plain resize."""
    kwargs = {"image_size": 24, "tokenizer": shapes_tokenizer, "max_query_len": 16}
    record = {"file_name": det_image, "image_id": 1, "caption": "a red box", "task": "caption"}
    plain = CaptionDatasetMapper(is_train=False, **kwargs)(record)["image"]
    assert torch.equal(CaptionDatasetMapper(is_train=True, **kwargs)(record)["image"], plain)
    random.seed(0)
    torch.manual_seed(0)
    train = CaptionDatasetMapper(is_train=True, train_transform="albef_randaug", **kwargs)
    images = [train(record)["image"] for _ in range(4)]
    assert all(i.shape == (3, 24, 24) and i.dtype == torch.uint8 for i in images)
    assert not all(torch.equal(i, plain) for i in images)
    evaluation = CaptionDatasetMapper(is_train=False, train_transform="albef_randaug", **kwargs)
    assert torch.equal(evaluation(record)["image"], plain)
    with pytest.raises(ConfigError, match="VL_CACHE_IMAGES needs"):
        CaptionDatasetMapper(
            is_train=True, train_transform="albef_randaug", cache_images=True, **kwargs
        )
    with pytest.raises(ValueError, match="VL_TRAIN_TRANSFORM must be one of"):
        CaptionDatasetMapper(is_train=True, train_transform="autoaugment", **kwargs)


def test_caption_mapper_image_cache(shapes_tokenizer, det_image, tmp_path, monkeypatch):
    """INPUT.VL_CACHE_IMAGES: each (file, height, width) is read once; the output is the uncached one."""
    from fiber_d2.data import caption_mapper

    reads, read = [], caption_mapper.read_record_image
    monkeypatch.setattr(
        caption_mapper, "read_record_image", lambda record, *a: reads.append(1) or read(record, *a)
    )
    kwargs = {
        "is_train": True,
        "image_size": 24,
        "tokenizer": shapes_tokenizer,
        "max_query_len": 16,
    }
    plain, cached = CaptionDatasetMapper(**kwargs), CaptionDatasetMapper(
        **kwargs, cache_images=True
    )
    record = {"file_name": det_image, "image_id": 1, "caption": "a red box", "task": "caption"}
    expected = plain(record)
    first = cached(dict(record, caption="two boxes"))
    first["image"][0, 0, 0] += 1  # a caller's copy: the cache keeps its own
    again = cached(record)
    assert len(reads) == 2  # plain once, cached once
    torch.testing.assert_close(again["image"], expected["image"], rtol=0, atol=0)
    assert (again["height"], again["width"]) == (expected["height"], expected["width"]) == (40, 60)
    # the record's size claim is part of the key: a wrong one is still caught
    assert cached(dict(record, height=41)) is None and cached.bad.skipped == 1
    with pytest.raises(ConfigError, match="INPUT.VL_CACHE_IMAGES needs INPUT.CAPTION_FLIP_PROB 0"):
        CaptionDatasetMapper(**kwargs, flip_prob=0.5, cache_images=True)


# the original's format (its ODinW configs), trailing comma included
CAPTION_PROMPT = (
    '[{"prefix": " ", "name": "red_box", "suffix": ""}, {"prefix": "", "name": "blue box", '
    '"suffix": " , which is blue"}, {"prefix": "a ", "name": "green box", "suffix": ""}, '
    '{"prefix": "", "name": "yellow box", "suffix": ""}, '
    '{"prefix": "", "name": "pink box", "suffix": " with dots "}, ]'
)


def test_caption_prompt_parsing_and_errors():
    entries = parse_caption_prompt(CAPTION_PROMPT)
    assert entries[1] == ("", "blue box", " , which is blue") and len(entries) == 5
    assert parse_caption_prompt("") == []
    with pytest.raises(ConfigError, match="DATASETS.CAPTION_PROMPT entry 0"):
        parse_caption_prompt('[{"prefix": "", "name": "x"}]')
    with pytest.raises(ConfigError, match="DATASETS.CAPTION_PROMPT is not a list literal"):
        parse_caption_prompt("[{")
    cfg = add_fiber_config(get_cfg())
    assert cfg.DATASETS.CAPTION_PROMPT == ""  # off by default


def test_caption_prompt_spans_cover_the_names_only(shapes_tokenizer, det_image):
    """Prefix and suffix are in the prompt, only the name is the category's span; names are
    cleaned in training and kept as written at test time, as the original."""
    tok, entries = shapes_tokenizer, parse_caption_prompt(CAPTION_PROMPT)
    test = mapper(tok, is_train=False, flip=0, caption_prompt=entries)(det_record(det_image))
    assert test["caption"] == (
        " red_box. blue box , which is blue. a green box. yellow box. pink box with dots "
    )
    assert decode_row(tok, test["input_ids"], test["label_token_map"][1]) == "blue box"
    assert decode_row(tok, test["input_ids"], test["label_token_map"][2]) == "green box"
    train = mapper(
        tok, flip=0, caption_prompt=entries, full_prompt_train=True, shuffle_prompt=False
    )(det_record(det_image))
    assert train["caption"].startswith(" red box. blue box , which is blue. a green box")
    label_map = train["label_token_map"]
    assert decode_row(tok, train["input_ids"], label_map[0]) == "red box"
    assert decode_row(tok, train["input_ids"], label_map[4]) == "pink box"
    gt = train["instances"]
    assert torch.equal(gt.gt_positive_map, label_map[gt.gt_classes])
    with pytest.raises(ValueError, match="FULL_PROMPT_TRAIN True and DATASETS.DISABLE_SHUFFLE"):
        mapper(tok, caption_prompt=entries, full_prompt_train=True, shuffle_prompt=True)
    with pytest.raises(ValueError, match="has 2 entries, dataset 'toy' has 5 categories"):
        mapper(tok, is_train=False, flip=0, caption_prompt=entries[:2])(det_record(det_image))


def test_chunked_prompts_keep_the_chunk_axis_when_one_chunk_holds_every_name(
    shapes_tokenizer, det_image
):
    """With TEST.CHUNKED_EVALUATION the model reads (K, T) inputs, also when K is 1."""
    m = mapper(shapes_tokenizer, is_train=False, flip=0, chunk_size=len(NAMES))
    out = m(det_record(det_image))
    assert out["input_ids"].shape == (1, T_LEN) and out["attention_mask"].shape == (1, T_LEN)
    assert out["label_token_map"].shape == (1, len(NAMES), T_LEN)
    assert out["caption"] == [". ".join(NAMES)]


def test_unreadable_test_image_becomes_a_black_image_of_the_record_size(shapes_tokenizer, tmp_path):
    """The placeholder has the record's height and width (40 x 60), so it is resized as the real
    image would be: shortest edge 80 -> 80 x 120."""
    record = det_record(str(tmp_path / "missing.png"))
    out = mapper(shapes_tokenizer, is_train=False, flip=0, unreadable_as_empty=True)(record)
    assert out["unreadable"] is True
    assert out["image"].shape == (3, 80, 120) and int(out["image"].max()) == 0
    assert (out["height"], out["width"]) == (40, 60)


def test_a_phrase_starting_where_the_prompt_is_cut_is_counted_as_cut_off(
    shapes_tokenizer, det_image
):
    """With 5 tokens the prompt keeps <s> "a" " red" " bo" </s>: the kept text ends at character 8,
    inside "box". A phrase starting there ("x", 8..9) has all its tokens past the prompt: it is
    cut off, not a phrase that covers no token."""
    record = grounding_record(det_image)
    record["phrases"] = [
        {"text": "a red", "tokens_positive": [[0, 5]], "boxes": [[35, 20, 50, 30]]},
        {"text": "x", "tokens_positive": [[8, 9]], "boxes": [[35, 20, 50, 30]]},
    ]
    m = mapper(shapes_tokenizer, is_train=False, flip=0, max_query_len=5)
    out = m(record)
    assert out["label_token_map"].any(dim=1).tolist() == [True, False]
    assert m.bad.cut_phrases == 1 and m.bad.tokenless_phrases == 0
