"""Random-negative ITM (coarse spec §3.5): label composition and the FIBERRetrievalITM training step."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from retrieval.itm import FIBERRetrievalITM, random_negative_labels

from fiber_d2.engine.setup import ConfigError, load_config

TINY_MODEL = [
    "MODEL.META_ARCHITECTURE", "FIBERRetrievalITM",
    "MODEL.COARSE.LOSSES", "['itm']",
    "MODEL.COARSE.LOSS_WEIGHTS", "[1.0]",
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
    "MODEL.COARSE.QUEUE_SIZE", "8",
]  # fmt: skip
SIZE, T = 64, 12


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 8])
def test_labels_have_floor_half_positives(batch_size):
    labels = random_negative_labels(batch_size, generator=torch.Generator().manual_seed(batch_size))
    assert labels.dtype == torch.long and labels.shape == (batch_size,)
    assert int(labels.sum()) == batch_size // 2
    assert int((labels == 0).sum()) == batch_size - batch_size // 2


def test_label_positions_are_random_and_seeded():
    seeded = [torch.Generator().manual_seed(s) for s in range(40)]
    draws = [tuple(random_negative_labels(8, generator=g).tolist()) for g in seeded]
    assert len(set(draws)) > 20  # C(8, 4) = 70 arrangements, not a fixed pattern
    per_position = torch.tensor(draws).float().mean(0)
    assert (per_position > 0.2).all() and (per_position < 0.8).all()
    again = random_negative_labels(8, generator=torch.Generator().manual_seed(3))
    assert tuple(again.tolist()) == draws[3]
    with pytest.raises(ValueError, match="batch size"):
        random_negative_labels(0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config("configs/Demo/coarse_tiny.yaml", TINY_MODEL)
    return build_model(cfg).train()


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image_id": k,
            "image": torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8),
            "false_image": torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8),
            "input_ids": torch.randint(5, 200, (T,), generator=g),
            "attention_mask": torch.ones(T, dtype=torch.long),
        }
        for k in range(n)
    ]


def test_training_step_pairs_positives_with_own_image_and_negatives_with_false_image(model):
    assert isinstance(model, FIBERRetrievalITM)
    assert not model.queue.holds_inputs  # random negatives: no raw-input queue to fill
    batch = _batch(5)
    captured = {}
    original = model.itm_logits

    def spy(images, ids, mask):
        captured["images"], captured["ids"] = images, ids
        captured["logits"] = original(images, ids, mask)
        return captured["logits"]

    model.generator = torch.Generator().manual_seed(7)
    model.itm_logits = spy
    try:
        losses = model(batch)
    finally:
        del model.itm_logits
        model.generator = None
    labels = random_negative_labels(5, generator=torch.Generator().manual_seed(7))
    assert int(labels.sum()) == 2
    norm = lambda x: (x.float() - model.pixel_mean) / model.pixel_std  # noqa: E731
    for k, x in enumerate(batch):
        own = x["image"] if labels[k] == 1 else x["false_image"]
        assert torch.allclose(captured["images"][k], norm(own)), k
        assert torch.equal(captured["ids"][k], x["input_ids"])  # captions never move
    assert set(losses) == {"loss_itm"}
    expected = F.cross_entropy(captured["logits"], labels)
    assert torch.allclose(losses["loss_itm"], expected)


def test_every_trainable_parameter_gets_a_gradient(model):
    # DDP without find_unused_parameters needs this; ITC/MLM-only tensors are frozen instead.
    model.zero_grad()
    sum(model(_batch(4, seed=1)).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "temp" in frozen and "image_norm.weight" in frozen
    assert any(n.startswith("cross_modal_text_pooler_itc.") for n in frozen)
    assert not any(n.startswith(("itm_score.", "cross_modal_text_pooler.")) for n in frozen)


def test_inference_returns_itc_embeddings(model):
    model.eval()
    try:
        batch = _batch(2)
        for x in batch:
            x["input_ids"] = x["input_ids"][None].repeat(3, 1)
            x["attention_mask"] = x["attention_mask"][None].repeat(3, 1)
        out = model(batch)
    finally:
        model.train()
    assert out[0]["text_embeddings"].shape[0] == 3
    assert torch.allclose(out[1]["image_embedding"].norm(), torch.tensor(1.0), atol=1e-5)


def test_bad_configurations_raise(model):
    with pytest.raises(KeyError, match="false_image"):
        model([{k: v for k, v in x.items() if k != "false_image"} for x in _batch(2)])
    cfg = load_config(
        "configs/Demo/coarse_tiny.yaml",
        TINY_MODEL
        + ["MODEL.COARSE.LOSSES", "['itc', 'itm']", "MODEL.COARSE.LOSS_WEIGHTS", "[1, 1]"],
    )
    with pytest.raises(ConfigError, match="LOSSES must be"):
        build_model(cfg)


def test_itm_loss_is_scaled_by_its_loss_weight(model):
    batch = _batch(4, seed=2)
    weights = model.loss_weights
    try:
        losses = {}
        for w in (1.0, 0.25):
            model.loss_weights = {**weights, "itm": w}
            model.generator = torch.Generator().manual_seed(5)
            torch.manual_seed(3)  # the same dropout draws for both weights
            losses[w] = model(batch)["loss_itm"]
    finally:
        model.loss_weights, model.generator = weights, None
    assert losses[1.0].item() > 0
    assert losses[0.25].item() == pytest.approx(0.25 * losses[1.0].item(), rel=1e-5)
