"""Prefix reuse for chunked prompts: the image prefix once per image, the text prefix once per chunk
(cached), the fused top + FPN + head per group of chunks, give the detections of running the whole
model once per chunk (boxes 1e-4, scores 1e-5)."""

import pytest
import torch
from detectron2.modeling import build_model

from fiber_d2.engine.setup import load_config

T = 48
K = 5  # chunks; groups of 2 -> 2 + 2 + 1


@pytest.fixture(scope="module")
def model():
    cfg = load_config(
        "configs/Demo/fine_tiny.yaml",
        [
            "MODEL.SWIN.DEPTHS",
            "[2, 2, 4, 2]",
            "MODEL.FIBER.NUM_FUSION_LAYERS",
            "3",
            "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN",
            str(T),
            "TEST.CHUNK_BATCH_SIZE",
            "2",
            "MODEL.ATSS.INFERENCE_TH",
            "0.0",
        ],
    )
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    with torch.no_grad():  # make the text matter to the image side (non-zero fusion gates)
        for name, p in m.named_parameters():
            if "gamma" in name or "alpha" in name:
                p.add_(0.5)
    return m


def _record(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(K, T, dtype=torch.long)
    maps = torch.zeros(K, 4, T, dtype=torch.bool)
    for k in range(K):
        n = 3 * (k + 2)  # different lengths: 6 .. 18 real tokens
        ids[k, 0], ids[k, n - 1] = 0, 2
        ids[k, 1 : n - 1] = torch.randint(5, 60, (n - 2,), generator=g)
        for label in range(4):
            maps[k, label, 1 + (label * (n - 2)) // 4 : 1 + ((label + 1) * (n - 2)) // 4] = True
    image = torch.randint(0, 256, (3, 90, 140), generator=g, dtype=torch.uint8)
    return dict(
        image=image,
        height=180,
        width=280,
        input_ids=ids,
        attention_mask=(ids != 1).long(),
        label_token_map=maps,
    )


def _detect(model, prefix_reuse: bool, record: dict):
    model.prefix_reuse = prefix_reuse
    return model([record])[0]["instances"]


def _assert_same(a, b):
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    assert torch.equal(a.pred_classes, b.pred_classes)


@pytest.mark.parametrize("pad_to_max", [False, True])
def test_prefix_reuse_gives_the_chunk_by_chunk_detections(model, pad_to_max):
    model.pad_to_max_query_len = pad_to_max
    model.eval()
    try:
        today = _detect(model, False, _record())
        reused = _detect(model, True, _record())
    finally:
        model.pad_to_max_query_len = False
    _assert_same(reused, today)
    assert set(today.pred_classes.tolist()) == {0, 1, 2, 3}


def test_text_prefixes_are_cached_per_chunk_group_and_dropped_on_mode_change(model):
    model.eval()
    calls = []
    text_prefix = model.backbone.bottom_up.forward_text_prefix
    model.backbone.bottom_up.forward_text_prefix = lambda *a: calls.append(a[0].shape) or (
        text_prefix(*a)
    )
    try:
        first = _detect(model, True, _record())
        assert [c[0] for c in calls] == [2, 2, 1] and len(model._text_prefixes) == 3
        second = _detect(model, True, _record(seed=0))  # same prompts, another image pass
        assert len(calls) == 3  # every text prefix came from the cache
        _assert_same(second, first)
        other = _record(seed=1)
        other["input_ids"], other["attention_mask"] = (
            _record()["input_ids"],
            _record()["attention_mask"],
        )
        _detect(model, True, other)  # a new image with the cached prompts
        assert len(calls) == 3
        model.eval()  # any mode switch (evaluation start, training) forgets the prefixes
        assert len(model._text_prefixes) == 0
        _detect(model, True, _record())
        assert len(calls) == 6
        model.load_state_dict(model.state_dict())  # new weights: forgotten too
        assert len(model._text_prefixes) == 0
    finally:
        del model.backbone.bottom_up.forward_text_prefix


def test_prefix_reuse_under_bf16_autocast_stays_close(model):
    model.eval()
    fp32 = _detect(model, True, _record())
    model.amp_dtype = "bfloat16"
    try:
        bf16 = _detect(model, True, _record())
        assert bf16.scores.dtype == torch.float32 or bf16.scores.dtype == torch.bfloat16
    finally:
        model.amp_dtype = ""
    assert len(bf16) > 0
    # the strongest detection survives bf16 with a close score
    assert abs(float(bf16.scores.max()) - float(fp32.scores.max())) < 0.05


def test_text_prefix_cache_keys_on_ids_and_mask_and_drops_the_least_recently_used(monkeypatch):
    from collections import OrderedDict
    from types import SimpleNamespace

    from fiber_d2.modeling.meta_arch import fiber as fiber_module

    calls = []

    def text_prefix(ids, mask):
        calls.append((ids.clone(), mask.clone()))
        return ids, None, mask

    stub = SimpleNamespace(
        _text_prefixes=OrderedDict(),
        backbone=SimpleNamespace(bottom_up=SimpleNamespace(forward_text_prefix=text_prefix)),
    )
    monkeypatch.setattr(fiber_module, "_TEXT_PREFIX_CACHE_SIZE", 2)
    get = fiber_module.FIBER._text_prefix.__get__(stub)
    ids = torch.tensor([[0, 5, 6, 2]])
    full, short = torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0]])
    assert torch.equal(get(ids, full)[2], full)
    assert torch.equal(get(ids, short)[2], short)  # same ids, another mask: another prefix
    assert len(calls) == 2
    get(ids, full)  # a hit makes it the most recent entry
    get(ids + 1, full)  # third entry: the least recently used one (ids, short) goes
    assert len(calls) == 3 and len(stub._text_prefixes) == 2
    get(ids, full)
    assert len(calls) == 3
    get(ids, short)
    assert len(calls) == 4
