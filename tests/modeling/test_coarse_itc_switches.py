"""The MODEL.COARSE switches for from-scratch towers: the defaults are the original's ITC (the model that
converted weights load into is unchanged), and each switch does what it says."""

import pytest
import torch
import torch.nn.functional as F

from fiber_d2.config import add_fiber_config
from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.meta_arch.coarse_losses import itc_logits, itc_loss
from fiber_d2.modeling.meta_arch.fiber_coarse import FIBERCoarse

SMALL = ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"]
SMALL += ["INPUT.IMAGE_SIZE", "64", "MODEL.COARSE.QUEUE_SIZE", "16"]
ORIGINAL = [
    "MODEL.COARSE.ITC_TEXT_POOL",
    "first",
    "MODEL.COARSE.QUEUE_INIT",
    "random",
    "MODEL.COARSE.ITC_BATCH_NORM",
    "False",
]
ITC_ONLY = ["MODEL.COARSE.LOSSES", "['itc']", "MODEL.COARSE.LOSS_WEIGHTS", "[1.0]"]


def _model(*opts):
    torch.manual_seed(0)
    return FIBERCoarse(load_config("configs/Demo/coarse_tiny.yaml", [*SMALL, *opts]))


def _batch(b=4, t=9, size=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 900, (b, t), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    ids[mask == 0] = 1
    images = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)
    records = [
        {"image": images[k], "input_ids": ids[k], "attention_mask": mask[k]} for k in range(b)
    ]
    return records, ids, mask


def test_defaults_are_the_original_itc():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_fiber_config(cfg)
    c = cfg.MODEL.COARSE
    assert (c.ITC_TEXT_POOL, c.QUEUE_INIT, c.ITC_BATCH_NORM) == ("first", "random", False)


def test_original_settings_add_no_state_and_keep_the_spec_itc():
    model = _model(*ORIGINAL, *ITC_ONLY).train()
    switched = _model(*ITC_ONLY, "MODEL.COARSE.ITC_BATCH_NORM", "True")
    extra = set(switched.state_dict()) - set(model.state_dict())
    assert extra and all(k.startswith(("itc_image_bn.", "itc_text_bn.")) for k in extra)
    assert not any(k.startswith(("itc_image_bn", "itc_text_bn")) for k in model.state_dict())

    records, ids, mask = _batch()
    # the spec's text embedding: dense + tanh on the transformed <s> output, L2-normalised
    hidden = model.backbone.forward_text(ids, mask)["hidden"]
    pooler = model.cross_modal_text_pooler_itc
    first = torch.tanh(pooler.dense(model.cross_modal_text_transform_itc(hidden)[:, 0]))
    assert torch.allclose(model.encode_text(ids, mask), F.normalize(first, dim=-1), atol=1e-6)

    # the spec's ITC loss: against the detached batch and the whole randn-initialised queue
    image_queue = model.queue.image_queue.clone()
    text_queue = model.queue.text_queue.clone()
    assert image_queue.abs().sum() > 0  # randn, not empty
    images = model._images(records)
    f_i, f_t = model.encode_image(images), model.encode_text(ids, mask)
    expected = itc_loss(*itc_logits(f_i, f_t, image_queue, text_queue, model.temp))
    loss = model(records)["loss_itc"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mean_text_pool_ignores_padding():
    model = _model(*ITC_ONLY, "MODEL.COARSE.ITC_TEXT_POOL", "mean").eval()
    _, ids, mask = _batch()
    hidden = model.backbone.forward_text(ids, mask)["hidden"]
    x = model.cross_modal_text_transform_itc(hidden)
    m = mask[..., None].float()
    mean = (x * m).sum(1) / m.sum(1)
    pooled = torch.tanh(model.cross_modal_text_pooler_itc.dense(mean))
    assert torch.allclose(model.encode_text(ids, mask), F.normalize(pooled, dim=-1), atol=1e-6)
    # a shorter caption's embedding does not depend on what its padding positions hold
    other = ids.clone()
    other[3, 3:] = 7
    assert torch.allclose(model.encode_text(other, mask)[3], model.encode_text(ids, mask)[3])


def test_empty_queue_uses_only_enqueued_columns():
    model = _model(*ITC_ONLY, "MODEL.COARSE.QUEUE_INIT", "empty").train()
    records, ids, mask = _batch()
    images = model._images(records)
    f_i, f_t = model.encode_image(images), model.encode_text(ids, mask)
    empty = torch.zeros(f_i.shape[1], 0)
    first = model(records)["loss_itc"]  # nothing enqueued yet: in-batch negatives only
    assert first.item() == pytest.approx(
        itc_loss(*itc_logits(f_i, f_t, empty, empty, model.temp)).item(), rel=1e-5
    )
    assert int(model.queue.queue_total) == 4
    second = model(records)["loss_itc"]  # the first step's four embeddings are now negatives
    iq, tq = model.queue.image_queue[:, :4], model.queue.text_queue[:, :4]
    # the queue holds this batch's embeddings from the first call (no parameter changed since)
    assert torch.allclose(iq, f_i.t(), atol=1e-6) and torch.allclose(tq, f_t.t(), atol=1e-6)
    assert second.item() == pytest.approx(
        itc_loss(*itc_logits(f_i, f_t, iq, tq, model.temp)).item(), rel=1e-5
    )


def test_batch_norm_standardises_the_itc_embeddings():
    model = _model(*ITC_ONLY, *ORIGINAL[:2], "MODEL.COARSE.ITC_BATCH_NORM", "True").train()
    records, ids, mask = _batch()
    hidden = model.backbone.forward_text(ids, mask)["hidden"]
    pooler = model.cross_modal_text_pooler_itc
    first = torch.tanh(pooler.dense(model.cross_modal_text_transform_itc(hidden)[:, 0]))
    standard = (first - first.mean(0)) / torch.sqrt(first.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(model.encode_text(ids, mask), F.normalize(standard, dim=-1), atol=1e-4)
    # evaluation uses the running statistics, so one caption's embedding does not depend on others
    model(records)
    model.eval()
    with torch.no_grad():
        alone = model.encode_text(ids[:1], mask[:1])
        together = model.encode_text(ids, mask)[:1]
    assert torch.allclose(alone, together, atol=1e-5)
