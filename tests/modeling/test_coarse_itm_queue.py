"""ITM's hard negatives from the queue (coarse spec §3.3-3.4, MODEL.COARSE.ITM_NEGATIVES "queue"): the
queue keeps each sample's inputs in the slot of its embeddings, and the negatives are drawn with the
softmax of the ITC logits over [this process's batch ; the filled queue slots]."""

import pytest
import torch
import torch.nn.functional as F
from tiny_coarse import ORIGINAL, caption_batch, tiny_coarse

from fiber_d2.modeling.meta_arch.coarse_losses import FeatureQueue, sample_hard_negatives


def _inputs(values, t=3, size=2):
    """One sample per value: a constant uint8 image and ids, an all-ones mask."""
    v = torch.tensor(values)
    images = v.view(-1, 1, 1, 1).expand(-1, 3, size, size).to(torch.uint8).contiguous()
    return images, v.view(-1, 1).expand(-1, t).contiguous(), torch.ones(len(values), t).long()


def test_queue_keeps_inputs_in_the_slots_of_their_embeddings():
    q = FeatureQueue(dim=2, size=4)
    q.hold_inputs(image_size=2, text_length=5, pad_token_id=1)
    q.enqueue(torch.zeros(3, 2), torch.zeros(3, 2), _inputs([10, 11, 12]))
    assert q.filled == 3
    q.enqueue(torch.ones(2, 2), torch.ones(2, 2), _inputs([20, 21]))  # wraps: slots 3, 0
    assert q.filled == 4 and q.queue_ptr.item() == 1 and q.queue_total.item() == 5
    assert q.image_input_queue[:, 0, 0, 0].tolist() == [21, 11, 12, 20]
    assert q.image_queue[0].tolist() == [1.0, 0.0, 0.0, 1.0]  # the embeddings' slots
    # texts padded to the queue's length with the pad id and mask 0
    assert q.text_input_queue[0].tolist() == [21, 21, 21, 1, 1]
    assert q.text_input_mask_queue[0].tolist() == [1, 1, 1, 0, 0]


def test_take_inputs_reads_the_batch_then_the_queue():
    q = FeatureQueue(dim=2, size=4)
    q.hold_inputs(image_size=2, text_length=3, pad_token_id=1)
    q.enqueue(torch.zeros(2, 2), torch.zeros(2, 2), _inputs([10, 11]))
    batch = _inputs([0, 1, 2], t=2)
    images, ids, mask = q.take_inputs(torch.tensor([4, 0]), torch.tensor([3, 2]), *batch)
    assert images[:, 0, 0, 0].tolist() == [11, 0]  # pool row 4 = queue slot 1
    assert ids.tolist() == [[10, 10, 10], [2, 2, 1]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_queue_refuses_inputs_it_cannot_hold():
    q = FeatureQueue(dim=2, size=4)
    q.hold_inputs(image_size=2, text_length=2, pad_token_id=1)
    with pytest.raises(ValueError, match="MAX_QUERY_LEN"):
        q.enqueue(torch.zeros(1, 2), torch.zeros(1, 2), _inputs([1], t=3))
    with pytest.raises(ValueError, match="INPUT.IMAGE_SIZE"):
        q.enqueue(torch.zeros(1, 2), torch.zeros(1, 2), _inputs([1], t=2, size=3))
    with pytest.raises(ValueError, match="needs the samples' inputs"):
        q.enqueue(torch.zeros(1, 2), torch.zeros(1, 2))


def test_a_lone_sample_draws_its_own_pair():
    """One candidate (one sample, empty queue): the original's +1e-9 draws the pair itself."""
    assert sample_hard_negatives(torch.zeros(2, 1), torch.zeros(2).long()).tolist() == [0, 0]


def _queued_model(*opts):
    """The tiny coarse model with 3 queued samples whose images / ids are 200 + slot."""
    model = tiny_coarse(*ORIGINAL, *opts).train()
    t = caption_batch()[1].shape[1]
    images, ids, mask = _inputs([200, 201, 202], t=t, size=64)
    model.queue.enqueue(torch.zeros(3, 64), torch.zeros(3, 64), (images, ids, mask))
    return model


def test_negatives_follow_the_itc_logits_over_batch_and_filled_queue():
    """Row b's logits peak at one pool column: the pair takes that column's input, the text's
    negative from sim_i2t, the image's from sim_t2i; unfilled queue columns are never drawn."""
    model = _queued_model()
    records, ids, mask = caption_batch()
    raw = torch.stack([r["image"] for r in records])
    b, q = 4, model.queue.image_queue.shape[1]
    sim_i2t = torch.zeros(b, b + q)
    sim_t2i = torch.zeros(b, b + q)
    sim_i2t[:, b + 3 :] = 1e4  # random, unfilled slots: outside the pool however large
    sim_t2i[:, b + 3 :] = 1e4
    sim_i2t[torch.arange(b), torch.tensor([4, 6, 1, 5])] = 100.0  # queue 0, queue 2, batch 1, q 1
    sim_t2i[torch.arange(b), torch.tensor([5, 0, 4, 2])] = 100.0  # queue 1, batch 0, q 0, batch 2
    images, pair_ids, pair_mask, labels = model.itm_queue_pairs(raw, ids, mask, sim_i2t, sim_t2i)
    assert labels.tolist() == [1] * b + [0] * (2 * b)
    assert torch.equal(images[: 2 * b], torch.cat([raw, raw]))
    assert torch.equal(images[2 * b], torch.full_like(raw[0], 201))
    assert torch.equal(images[2 * b + 1], raw[0]) and torch.equal(images[2 * b + 3], raw[2])
    assert torch.equal(images[2 * b + 2], torch.full_like(raw[0], 200))
    # texts at the queue's length (MAX_QUERY_LEN), the batch's padded
    t = ids.shape[1]
    assert torch.equal(pair_ids[:b, :t], ids) and torch.equal(pair_mask[2 * b :, :t], mask)
    assert pair_ids[b : 2 * b, 0].tolist() == [200, 202, ids[1, 0].item(), 201]
    assert pair_mask[:, t:].sum() == 0


def test_a_training_step_draws_from_the_queue_then_enqueues_its_inputs(monkeypatch):
    no_dropout = ["MODEL.LANGUAGE_BACKBONE.HIDDEN_DROPOUT", "0.0"]
    no_dropout += [
        "MODEL.LANGUAGE_BACKBONE.ATTENTION_DROPOUT",
        "0.0",
        "MODEL.SWIN.DROP_PATH_RATE",
        "0.0",
    ]
    itc_itm = ["MODEL.COARSE.LOSSES", "['itc', 'itm']", "MODEL.COARSE.LOSS_WEIGHTS", "[1.0, 1.0]"]
    model = _queued_model(*no_dropout, *itc_itm)
    records, ids, mask = caption_batch()
    seen = {}
    original = model.itm_queue_rows

    def spy(*args):
        seen["filled"] = model.queue.filled
        seen["rows"] = original(*args)
        return seen["rows"]

    monkeypatch.setattr(model, "itm_queue_rows", spy)
    losses = model(records)
    assert seen["filled"] == 3  # this step's samples are not in the pool yet
    # the loss is the ITM head's cross-entropy on the drawn pairs
    image_rows, text_rows, labels = seen["rows"]
    raw = torch.stack([r["image"] for r in records])
    pairs = model.queue.take_inputs(image_rows, text_rows, raw, ids, mask)
    with torch.no_grad():
        logits = model.itm_logits(*model._pair_inputs(*pairs))
    torch.testing.assert_close(losses["loss_itm"].detach(), F.cross_entropy(logits, labels))
    assert losses["loss_itm"].requires_grad
    # then the step's samples are queued, inputs beside their embeddings
    assert model.queue.filled == 7 and model.queue.queue_ptr.item() == 7
    for k, r in enumerate(records):
        assert torch.equal(model.queue.image_input_queue[3 + k], r["image"])
        assert torch.equal(model.queue.text_input_queue[3 + k, : ids.shape[1]], r["input_ids"])


def test_only_queued_negatives_keep_inputs():
    model = _queued_model()
    assert model.queue.holds_inputs
    # the same on every rank (each enqueues the gathered inputs): kept out of DDP's broadcast
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert ignored == {
        "queue.image_input_queue",
        "queue.text_input_queue",
        "queue.text_input_mask_queue",
    }
    assert ignored <= set(dict(model.named_buffers()))
    assert not tiny_coarse(*ORIGINAL, "MODEL.COARSE.ITM_NEGATIVES", "batch").queue.holds_inputs
    itc = ["MODEL.COARSE.LOSSES", "['itc']", "MODEL.COARSE.LOSS_WEIGHTS", "[1.0]"]
    assert not tiny_coarse(*ORIGINAL, *itc).queue.holds_inputs
    with pytest.raises(ValueError, match="MODEL.COARSE.ITM_NEGATIVES must be"):
        tiny_coarse("MODEL.COARSE.ITM_NEGATIVES", "gathered")


def test_a_queue_saved_without_inputs_restarts_empty(caplog):
    """Resuming a run saved without the input queue: its filled slots have no inputs to draw."""
    old = FeatureQueue(dim=2, size=4)
    old.enqueue(torch.ones(3, 2), torch.ones(3, 2))
    q = FeatureQueue(dim=2, size=4)
    q.hold_inputs(image_size=2, text_length=3, pad_token_id=1)
    fresh = {k: v.clone() for k, v in q.state_dict().items()}
    with caplog.at_level("WARNING"):
        missing = q.load_state_dict(old.state_dict(), strict=False).missing_keys
    assert "no ITM input queue" in caplog.text and q.filled == 0
    assert all(torch.equal(v, fresh[k]) for k, v in q.state_dict().items())
    assert "queue_total" in missing
    # a queue saved with its inputs loads whole
    q.enqueue(torch.ones(2, 2), torch.ones(2, 2), _inputs([5, 6]))
    other = FeatureQueue(dim=2, size=4)
    other.hold_inputs(image_size=2, text_length=3, pad_token_id=1)
    other.load_state_dict(q.state_dict())
    assert other.filled == 2 and other.image_input_queue[1, 0, 0, 0] == 6
