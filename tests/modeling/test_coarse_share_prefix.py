"""MODEL.COARSE.SHARE_PREFIX: one image prefix (and one caption text prefix) per training step gives
the losses and gradients of the original's one-prefix-per-pass step, and really computes it once."""

import pytest
import torch
from tiny_coarse import SMALL, caption_batch

from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.meta_arch.fiber_coarse import FIBERCoarse

# the prefix blocks and layers must be deterministic for the equality (the Demo's settings)
DETERMINISTIC = [
    "MODEL.SWIN.DROP_PATH_RATE",
    "0.0",
    "MODEL.LANGUAGE_BACKBONE.HIDDEN_DROPOUT",
    "0.0",
]
DETERMINISTIC += ["MODEL.LANGUAGE_BACKBONE.ATTENTION_DROPOUT", "0.0"]
# ITM's hard negatives from the batch (its pairs are rows of the shared prefixes) or, the default,
# from the batch and the queue (the queued images' prefixes run for the pairs)
BATCH_NEGATIVES = ["MODEL.COARSE.ITM_NEGATIVES", "batch"]


def _model(share: bool, *opts, negatives: str = "batch") -> FIBERCoarse:
    """The tiny coarse model; with queued negatives, 4 samples already queued (the same in every
    model built here)."""
    torch.manual_seed(0)
    cfg = load_config(
        "configs/Demo/coarse_tiny.yaml",
        [*SMALL, *DETERMINISTIC, "MODEL.COARSE.ITM_NEGATIVES", negatives]
        + ["MODEL.COARSE.SHARE_PREFIX", str(share), *opts],
    )
    model = FIBERCoarse(cfg).train()
    if model.queue_holds_inputs:
        g = torch.Generator().manual_seed(3)
        dim = model.queue.image_queue.shape[0]
        features = torch.nn.functional.normalize(torch.randn(4, dim, generator=g), dim=-1)
        records, ids, mask = caption_batch()
        images = torch.randint(0, 256, (4, 3, 64, 64), generator=g, dtype=torch.uint8)
        model.queue.enqueue(features, features.flip(0), (images, ids.flip(0), mask.flip(0)))
    return model


def _batch() -> list[dict]:
    """The shared caption batch (4 captions, two of them padded), one masked word per caption."""
    records, ids, _ = caption_batch()
    for r in records:
        r["mlm_input_ids"] = r["input_ids"].clone()
        r["mlm_input_ids"][2] = 3
        r["mlm_labels"] = torch.full_like(r["input_ids"], -100)
        r["mlm_labels"][2] = r["input_ids"][2]
    return records


def _losses_and_grads(model: FIBERCoarse, batch: list[dict]):
    torch.manual_seed(5)  # the same ITM hard negatives on both sides
    losses = model(batch)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize(
    "losses,negatives",
    [(["itc", "itm", "mlm"], "batch"), (["itc", "itm", "mlm"], "queue"), (["itc", "mlm"], "batch")],
    ids=["itc+itm+mlm", "itc+itm+mlm-queued-negatives", "itc+mlm"],
)
def test_shared_prefix_gives_the_per_pass_losses_and_gradients(losses, negatives, monkeypatch):
    opts = ["MODEL.COARSE.LOSSES", str(losses)]
    opts += ["MODEL.COARSE.LOSS_WEIGHTS", str([1.0] * len(losses))]
    batch = _batch()
    ref_losses, ref_grads = _losses_and_grads(_model(False, *opts, negatives=negatives), batch)
    shared = _model(True, *opts, negatives=negatives)
    if negatives == "queue":  # the pairs hold queued images and texts, and batch ones
        drawn = shared.itm_queue_rows
        rows = {}
        monkeypatch.setattr(shared, "itm_queue_rows", lambda *a: rows.setdefault("rows", drawn(*a)))
    got_losses, got_grads = _losses_and_grads(shared, batch)
    if negatives == "queue":
        image_rows, text_rows, _ = rows["rows"]
        assert (image_rows[8:] >= 4).any() and (image_rows[8:] < 4).any()
        assert (text_rows[4:8] >= 4).any()
    assert set(got_losses) == {f"loss_{k}" for k in losses}
    for k, v in ref_losses.items():
        torch.testing.assert_close(got_losses[k], v, rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys()
    # the prefix gets its gradient from every pass, the fused top and the heads too
    prefix_params = [n for n in ref_grads if "layers.0." in n or "encoder.layer.0." in n]
    assert prefix_params and all(ref_grads[n].abs().sum() > 0 for n in prefix_params)
    for n, g in ref_grads.items():  # at 1e-5 of each tensor's largest entry
        scale = 1e-5 * g.abs().max().item() + 1e-8
        torch.testing.assert_close(got_grads[n], g, rtol=0, atol=scale, msg=n)


def test_shared_prefix_runs_the_prefix_once_per_step():
    calls = {}

    def count(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1

        return hook

    for share in (False, True):
        model = _model(share)
        calls.clear()
        handles = [
            model.backbone.image_tower.patch_embed.register_forward_hook(count("image")),
            model.backbone.text_tower.model.embeddings.register_forward_hook(count("text")),
        ]
        model(_batch())
        for h in handles:
            h.remove()
        # ITC + MLM + ITM (one fused pass over 3B pairs) image passes; ITC, MLM, ITM text passes;
        # shared: one image prefix, the captions' and the masked captions' text prefixes
        assert calls == ({"image": 1, "text": 2} if share else {"image": 3, "text": 3}), share


def test_shared_prefix_is_off_by_default():
    cfg = load_config("configs/Demo/coarse_tiny.yaml", SMALL)
    assert cfg.MODEL.COARSE.SHARE_PREFIX is False
    assert FIBERCoarse(cfg).share_prefix is False


def test_pair_prefix_runs_the_image_prefix_of_every_queued_image():
    """ITM pairs whose image is a queued sample (pool row >= B, the first queued slot B included)
    get that image's own prefix; pairs of the batch's images take the shared prefix's rows."""
    model = _model(True, negatives="queue")
    records, ids, mask = caption_batch()
    raw = torch.stack([r["image"] for r in records])
    b = raw.shape[0]
    image_rows = torch.tensor([2, b, b + 1, 0])  # batch, first queued slot, second, batch
    text_rows = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        shared = model.backbone.forward_prefix(model._normalize(raw), ids, mask)
        pairs = model.queue.take_inputs(image_rows, text_rows, raw, ids, mask)
        images, pair_ids, pair_mask = model._pair_inputs(*pairs)
        assert not torch.equal(pairs[0][1], raw[b - 1])  # the first queued image is another one
        prefix = model._pair_prefix(shared, image_rows, images, pair_ids, pair_mask)
        want_x, want_outputs = model.backbone.forward_image_prefix(images)
    torch.testing.assert_close(prefix.image, want_x, rtol=1e-5, atol=1e-5)
    assert prefix.image_outputs.keys() == want_outputs.keys()
    for k, v in want_outputs.items():
        torch.testing.assert_close(prefix.image_outputs[k], v, rtol=1e-5, atol=1e-5, msg=k)
