"""The MODEL.COARSE switches for from-scratch towers: the defaults are the original's ITC (the model that
converted weights load into is unchanged), and each switch does what it says."""

import pytest
import torch
import torch.nn.functional as F
from tiny_coarse import ITC_ONLY, ORIGINAL, caption_batch, tiny_coarse

from fiber_d2.config import add_fiber_config
from fiber_d2.modeling.meta_arch.coarse_losses import itc_logits, itc_loss


def test_defaults_are_the_original_itc():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_fiber_config(cfg)
    c = cfg.MODEL.COARSE
    assert (c.ITC_TEXT_POOL, c.QUEUE_INIT, c.ITC_BATCH_NORM) == ("first", "random", False)


def test_original_settings_add_no_state_and_keep_the_spec_itc():
    model = tiny_coarse(*ORIGINAL, *ITC_ONLY).train()
    switched = tiny_coarse(*ITC_ONLY, "MODEL.COARSE.ITC_BATCH_NORM", "True")
    extra = set(switched.state_dict()) - set(model.state_dict())
    assert extra and all(k.startswith(("itc_image_bn.", "itc_text_bn.")) for k in extra)
    assert not any(k.startswith(("itc_image_bn", "itc_text_bn")) for k in model.state_dict())

    records, ids, mask = caption_batch()
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
    model = tiny_coarse(*ITC_ONLY, "MODEL.COARSE.ITC_TEXT_POOL", "mean").eval()
    _, ids, mask = caption_batch()
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
    model = tiny_coarse(*ITC_ONLY, "MODEL.COARSE.QUEUE_INIT", "empty").train()
    records, ids, mask = caption_batch()
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
    model = tiny_coarse(*ITC_ONLY, *ORIGINAL[:2], "MODEL.COARSE.ITC_BATCH_NORM", "True").train()
    records, ids, mask = caption_batch()
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
