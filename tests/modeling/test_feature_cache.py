"""MODEL.COARSE.FEATURE_CACHE: a task model with a frozen, dropout-free fused backbone keeps the
backbone's part of each (image, text) input and runs the backbone only for inputs it has not seen;
``cls_feats`` and the gradients of what trains equal the uncached ones up to rounding."""

import pytest
import torch

from fiber_d2.config import ConfigError
from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.meta_arch import FIBERFusedTask

SMALL = ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"]
SMALL += ["INPUT.IMAGE_SIZE", "64", "MODEL.SWIN.WINDOW_SIZE", "2"]
FROZEN = ["MODEL.SWIN.FREEZE_AT", "4", "MODEL.LANGUAGE_BACKBONE.FREEZE", "True"]
CACHE = ["MODEL.COARSE.FEATURE_CACHE", "True"]
PREFIX = ["MODEL.COARSE.IMAGE_PREFIX_CACHE", "True"]
BN = ["MODEL.COARSE.CLS_BATCH_NORM", "True"]


def _task(*opts):
    cfg = load_config("configs/Demo/coarse_tiny.yaml", [*SMALL, *opts])
    torch.manual_seed(0)
    return FIBERFusedTask(**FIBERFusedTask.from_config(cfg))


def _records(n=4, t=9, seed=1):
    """NLVR2-like records: two uint8 images and one text each; record 3 repeats record 0."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        ids = torch.randint(4, 900, (t,), generator=g)
        ids[0] = 0
        mask = torch.ones(t, dtype=torch.long)
        mask[6 + i % 3 :] = 0
        ids[mask == 0] = 1
        images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g) for _ in "01"]
        records.append({"image_0": images[0], "image_1": images[1], "input_ids": ids})
        records[-1]["attention_mask"] = mask
    records[3] = dict(records[0])
    return records


def _count_backbone_rows(model):
    """Wraps ``model.backbone.forward``; returns the list it appends each call's batch size to."""
    rows, forward = [], model.backbone.forward

    def counted(images, *args, **kwargs):
        rows.append(images.shape[0])
        return forward(images, *args, **kwargs)

    model.backbone.forward = counted
    return rows


@pytest.mark.parametrize("extra", [[], PREFIX], ids=["cls", "cls+image_prefix"])
def test_cached_cls_feats_and_gradients_equal_the_uncached_ones(extra):
    plain, cached = _task(*FROZEN).train(), _task(*FROZEN, *CACHE, *extra).train()
    assert plain.feature_cache is None and cached.feature_cache == {}
    assert (cached.image_prefix_cache == {}) if extra else (cached.image_prefix_cache is None)
    records, keys = _records(), ("image_0", "image_1")
    expected = plain.cls_feats_of(records, keys)
    # off, cls_feats_of is exactly the fused forward of the K * B inputs, key-major
    ids = torch.stack([x["input_ids"] for x in records]).repeat(2, 1)
    mask = torch.stack([x["attention_mask"] for x in records]).repeat(2, 1)
    images = torch.cat([plain.images(records, k) for k in keys])
    torch.testing.assert_close(expected, plain.cls_feats(images, ids, mask), rtol=0, atol=0)
    for _ in range(2):  # filling the cache, then reading it only
        out = cached.cls_feats_of(records, keys)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        out.square().sum().backward()
    expected.square().sum().backward()
    assert not any(p.requires_grad for p in plain.backbone.parameters())
    reached = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    # the cross-modal transforms and poolers (weights and biases) train through cls_feats
    assert len(reached) == 8 and all(g.abs().sum() > 0 for g in reached.values())
    for name, p in cached.named_parameters():
        if name not in reached:
            assert p.grad is None, name
            continue
        # two identical steps accumulated in the cached model; at 1e-5 of the largest entry
        scale = float(reached[name].abs().max())
        torch.testing.assert_close(p.grad / 2, reached[name], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("extra", [[], PREFIX], ids=["cls", "cls+image_prefix"])
def test_cached_cls_feats_are_batch_standardised_as_the_uncached_ones(extra):
    """MODEL.COARSE.CLS_BATCH_NORM applies to the cached cls_feats too: with the cache or without,
    each dimension has mean 0 over the training batch."""
    plain, cached = _task(*FROZEN, *BN).train(), _task(*FROZEN, *BN, *CACHE, *extra).train()
    assert plain.cls_bn is not None and cached.cls_bn is not None
    records, keys = _records(), ("image_0", "image_1")
    with torch.no_grad():
        expected = plain.cls_feats_of(records, keys)
        for _ in range(2):  # filling the cache, then reading it only
            out = cached.cls_feats_of(records, keys)
            # the batch standardisation scales the rounding of the cached path up
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
            torch.testing.assert_close(out.mean(0), torch.zeros(out.shape[1]), rtol=0, atol=1e-4)


def test_the_backbone_runs_only_for_inputs_not_seen_before():
    model = _task(*FROZEN, *CACHE).train()
    rows = _count_backbone_rows(model)
    records, keys = _records(), ("image_0", "image_1")
    first = model.cls_feats_of(records, keys).detach()
    assert rows == [6]  # 8 inputs, record 3 repeating record 0
    assert len(model.feature_cache) == 6
    torch.testing.assert_close(first[3], first[0], rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.cls_feats_of(records[:2], ("image_1",)), first[4:6])
    assert rows == [6]
    # the key is the content: one changed pixel, or another text with the same image, is new
    changed = [dict(records[1]), dict(records[2])]
    changed[0]["image_0"] = changed[0]["image_0"].clone()
    changed[0]["image_0"][0, 0, 0] ^= 1
    changed[1]["input_ids"] = records[1]["input_ids"]
    changed[1]["attention_mask"] = records[1]["attention_mask"]
    with torch.no_grad():
        model.cls_feats_of(changed, ("image_0",))
    assert rows == [6, 2] and len(model.feature_cache) == 8


def test_the_image_prefix_runs_once_per_image_whatever_the_text():
    plain, model = _task(*FROZEN).eval(), _task(*FROZEN, *CACHE, *PREFIX).eval()
    full_rows = _count_backbone_rows(model)
    prefix_rows, image_prefix = [], model.backbone.forward_image_prefix

    def counted(images):
        prefix_rows.append(images.shape[0])
        return image_prefix(images)

    model.backbone.forward_image_prefix = counted
    records, keys = _records(), ("image_0", "image_1")
    with torch.no_grad():
        out = model.cls_feats_of(records, keys)
        torch.testing.assert_close(out, plain.cls_feats_of(records, keys), rtol=0, atol=1e-5)
        assert prefix_rows == [6] and len(model.image_prefix_cache) == 6  # record 3 repeats 0
        # the same images with other texts: new inputs for the feature cache, not new images
        other = _records(seed=2)
        for new, old in zip(other, records):
            new["image_0"], new["image_1"] = old["image_0"], old["image_1"]
        out = model.cls_feats_of(other, keys)
        torch.testing.assert_close(out, plain.cls_feats_of(other, keys), rtol=0, atol=1e-5)
    assert prefix_rows == [6] and len(model.feature_cache) == 12
    assert full_rows == []  # the whole backbone never ran: text prefix and fused top only


@pytest.mark.parametrize(
    "opts, needs",
    [
        (["MODEL.SWIN.FREEZE_AT", "4"], "e.g. backbone.text_tower."),
        (["MODEL.LANGUAGE_BACKBONE.FREEZE", "True"], "e.g. backbone.image_tower."),
        ([*FROZEN, "MODEL.LANGUAGE_BACKBONE.HIDDEN_DROPOUT", "0.1"], "dropout at backbone.text"),
    ],
)
def test_a_trainable_or_random_backbone_is_refused(opts, needs):
    """A ConfigError: the tools print it as one line (it was a traceback from the model's build)."""
    with pytest.raises(ConfigError, match="MODEL.COARSE.FEATURE_CACHE") as err:
        _task(*opts, *CACHE)
    assert needs in str(err.value)


def test_the_image_prefix_cache_needs_the_feature_cache():
    with pytest.raises(ConfigError, match="IMAGE_PREFIX_CACHE needs MODEL.COARSE.FEATURE_CACHE"):
        _task(*FROZEN, *PREFIX)


def test_a_full_cache_stops_growing_and_keeps_the_outputs(caplog):
    records, keys = _records(), ("image_0", "image_1")
    unbounded = _task(*FROZEN, *CACHE).eval()
    with torch.no_grad():
        expected = unbounded.cls_feats_of(records, keys)
    entry = next(iter(unbounded.feature_cache.values()))
    size = entry.numel() * entry.element_size()
    assert unbounded.cache_bytes == 6 * size
    model = _task(*FROZEN, *CACHE, "MODEL.COARSE.FEATURE_CACHE_MAX_MB", "1").eval()
    assert model.cache_max_bytes == 2**20
    model.cache_max_bytes = int(4.5 * size)  # room for 4 entries
    rows = _count_backbone_rows(model)
    with caplog.at_level("WARNING"), torch.no_grad():
        for _ in range(2):
            out = model.cls_feats_of(records, keys)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert len(model.feature_cache) == 4 and model.cache_bytes == 4 * size
    assert rows == [6, 2]  # the second call runs the backbone for the 2 inputs left out only
    assert caplog.text.count("the feature caches are full") == 1
    with pytest.raises(ConfigError, match="FEATURE_CACHE_MAX_MB must be > 0"):
        _task(*FROZEN, *CACHE, "MODEL.COARSE.FEATURE_CACHE_MAX_MB", "0")


def test_inputs_differing_only_in_their_attention_mask_are_cached_apart():
    model = _task(*FROZEN, *CACHE).eval()
    rows = _count_backbone_rows(model)
    record = _records()[0]
    shorter = dict(record, attention_mask=record["attention_mask"].clone())
    shorter["attention_mask"][3:] = 0  # same ids, fewer visible tokens
    with torch.no_grad():
        a = model.cls_feats_of([record], ("image_0",))
        b = model.cls_feats_of([shorter], ("image_0",))
    assert rows == [1, 1] and len(model.feature_cache) == 2
    assert (a - b).abs().max() > 1e-6


def test_loading_weights_drops_the_cached_outputs():
    """New backbone weights make every cached output stale: after ``load_state_dict`` the features
    are those of the new weights, as a model without a cache gives them."""
    cached = _task(*FROZEN, *CACHE, "MODEL.COARSE.IMAGE_PREFIX_CACHE", "True").eval()
    plain = _task(*FROZEN).eval()
    records = _records()[:2]
    state = cached.state_dict()
    for k, v in state.items():
        if k.startswith("backbone.") and v.is_floating_point():
            state[k] = v + 0.1
    with torch.no_grad():
        before = cached.cls_feats_of(records, ("image_0",))
        assert cached.cache_bytes > 0 and cached.image_prefix_cache
        cached.load_state_dict(state)
        plain.load_state_dict(state)
        after = cached.cls_feats_of(records, ("image_0",))
        want = plain.cls_feats_of(records, ("image_0",))
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
