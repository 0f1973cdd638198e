"""The coarse model's paths, heads and ITM pairs, each recomputed from the spec's prose (coarse §1.6,
§1.7, §2, §3.4) with the model's own parameters: the outputs a converted checkpoint depends on."""

import pytest
import torch
import torch.nn.functional as F
from tiny_coarse import ITC_ONLY, ORIGINAL, caption_batch, tiny_coarse


def _mean_pool(pooler, tokens):
    """Dense + tanh on the token mean: (B, N, D) -> (B, D)."""
    return torch.tanh(pooler.dense(tokens.mean(dim=1)))


def test_unimodal_image_embedding():
    """§1.6: all stages without text, the final Swin norm, transform, mean, dense + tanh, L2."""
    model = tiny_coarse(*ORIGINAL).eval()
    records, _, _ = caption_batch()
    images = model._images(records)
    with torch.no_grad():
        last = model.backbone.forward_image(images)["res5"]  # (B, C, h, w)
        tokens = model.image_norm(last.flatten(2).transpose(1, 2))
        pooled = _mean_pool(
            model.cross_modal_image_pooler_itc, model.cross_modal_image_transform_itc(tokens)
        )
        got = model.encode_image(images)
    assert torch.allclose(got, F.normalize(pooled, dim=-1), atol=1e-6)
    # the final norm is part of the path: without it the embedding differs
    without = _mean_pool(
        model.cross_modal_image_pooler_itc,
        model.cross_modal_image_transform_itc(last.flatten(2).transpose(1, 2)),
    )
    assert not torch.allclose(got, F.normalize(without, dim=-1), atol=1e-3)


def test_fused_cls_feats_skip_the_final_norms_and_put_text_first():
    """§1.7: transforms on the raw fused states, ``cls_feats`` = [text <s> pooled ; image mean pooled]."""
    model = tiny_coarse(*ORIGINAL).eval()
    records, ids, mask = caption_batch()
    images = model._images(records)
    with torch.no_grad():
        image_features, text = model.backbone(images, ids, mask, fuse=True)
        text_feats = model.cross_modal_text_transform(text["hidden"])
        image_tokens = image_features["res5"].flatten(2).transpose(1, 2)
        image_feats = model.cross_modal_image_transform(image_tokens)
        text_cls = torch.tanh(model.cross_modal_text_pooler.dense(text_feats[:, 0]))
        image_cls = _mean_pool(model.cross_modal_image_pooler, image_feats)
        out = model.fused(images, ids, mask)
    assert torch.allclose(out["text_feats"], text_feats, atol=1e-6)
    assert torch.allclose(out["image_feats"], image_feats, atol=1e-6)
    assert torch.allclose(out["cls_feats"], torch.cat([text_cls, image_cls], dim=-1), atol=1e-6)


def test_mlm_head():
    """§2: dense, GELU, LayerNorm (eps 1e-12), then an untied bias-free decoder plus ``bias``."""
    model = tiny_coarse(*ORIGINAL).eval()
    head = model.mlm_score
    torch.nn.init.normal_(head.bias)  # zero at init; make it count
    x = torch.randn(
        2, 3, head.transform.dense.in_features, generator=torch.Generator().manual_seed(0)
    )
    h = F.gelu(head.transform.dense(x))
    h = F.layer_norm(
        h, h.shape[-1:], head.transform.LayerNorm.weight, head.transform.LayerNorm.bias, eps=1e-12
    )
    expected = h @ head.decoder.weight.t() + head.bias
    assert head.decoder.bias is None
    assert torch.allclose(head(x), expected, atol=1e-5)


def test_itm_negatives_follow_each_direction_of_the_itc_similarities():
    """§3.4: each image's negative text is drawn with softmax(sim_i2t), each text's negative image
    with softmax(sim_t2i); the 3B pairs are [positives | (image, negative text) | (negative image,
    text)] with labels 1, 0, 0."""
    model = tiny_coarse(*ORIGINAL)
    with torch.no_grad():
        model.temp.fill_(0.01)  # similarities of 1 against 0 become near-certain draws
    # images 0 and 1 alike, 2 and 3 alike; text b names one image of the other pair
    f_i = F.normalize(
        torch.tensor([[1, 0.5, 0, 0], [0.5, 1, 0, 0], [0, 0, 1, 0.5], [0, 0, 0.5, 1]])
    )
    f_t = torch.eye(4)[[2, 3, 0, 1]]
    image_rows, text_rows, labels = model.itm_pair_rows(f_i, f_t)
    # hand-worked: sim_i2t[b] = f_i[b] . f_t peaks (0.89 against at most 0.45) at texts 2, 3, 0, 1
    # and sim_t2i[b] = f_t[b] . f_i at images 2, 3, 0, 1; the images' own similarities would
    # point to 1, 0, 3, 2 instead
    assert image_rows.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 2, 3, 0, 1]
    assert text_rows.tolist() == [0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3]
    assert labels.tolist() == [1] * 4 + [0] * 8


@pytest.mark.parametrize("start, clamped", [(1e-4, 1e-3), (3.0, 1.0), (0.05, 0.05)])
def test_temperature_is_clamped_before_each_step(start, clamped):
    """§3.3: the learnable temperature is clamped in place to [0.001, 1] before ITC runs."""
    model = tiny_coarse(*ORIGINAL, *ITC_ONLY).train()
    with torch.no_grad():
        model.temp.fill_(start)
    model(caption_batch()[0])
    assert model.temp.item() == pytest.approx(clamped)


def test_zero_gates_fused_forward_is_the_unimodal_one_without_the_last_text_norm():
    """§1.6 / §1.7: with the gates at their initial 0 the fused forward equals the unimodal one,
    except that the last text layer's output LayerNorm is skipped (and ``vit_model.norm``, which
    the coarse model applies itself on the unimodal path only)."""
    model = tiny_coarse(*ORIGINAL).eval()
    records, ids, mask = caption_batch()
    images = model._images(records)
    backbone = model.backbone
    assert all(p.item() == 0 for n, p in backbone.named_parameters() if "alpha_" in n)
    with torch.no_grad():
        fused_image, fused_text = backbone(images, ids, mask, fuse=True)
        image, text = backbone.forward_image(images), backbone.forward_text(ids, mask)
        last_norm = backbone.text_tower.model.encoder.layer[-1].output.LayerNorm
        normed = last_norm(fused_text["hidden"])
    assert torch.equal(fused_image["res5"], image["res5"])
    assert torch.allclose(normed, text["hidden"], atol=1e-6)
    assert not torch.allclose(fused_text["hidden"], text["hidden"], atol=1e-3)


def test_each_objective_is_scaled_by_its_own_loss_weight():
    """MODEL.COARSE.LOSS_WEIGHTS: each objective's loss is multiplied by its own entry (the same
    step with weights 1 and with other weights differs by exactly those factors)."""
    records, _, _ = caption_batch()
    for r in records:  # one masked word per caption
        r["mlm_input_ids"] = r["input_ids"].clone()
        r["mlm_input_ids"][2] = 3
        r["mlm_labels"] = torch.full_like(r["input_ids"], -100)
        r["mlm_labels"][2] = r["input_ids"][2]
    weights = {"itc": 2.0, "itm": 3.0, "mlm": 0.5}
    losses = {}
    for name, w in (("unit", [1.0, 1.0, 1.0]), ("weighted", list(weights.values()))):
        model = tiny_coarse(
            *ORIGINAL,
            "MODEL.COARSE.LOSSES",
            str(list(weights)),
            "MODEL.COARSE.LOSS_WEIGHTS",
            str(w),
        ).train()
        torch.manual_seed(5)  # the same dropout and ITM hard negatives in both steps
        with torch.no_grad():
            losses[name] = model(records)
    assert set(losses["weighted"]) == {f"loss_{k}" for k in weights}
    for k, w in weights.items():
        unit = losses["unit"][f"loss_{k}"]
        assert unit.item() > 0
        torch.testing.assert_close(losses["weighted"][f"loss_{k}"], w * unit)


def test_init_head_normal_002_weights_zero_biases_unit_layer_norms():
    """Coarse spec §1.1, "Other new heads": N(0, 0.02) weights, zero biases, LayerNorm 1 / 0."""
    from fiber_d2.modeling.meta_arch import init_head

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(400, 500), torch.nn.LayerNorm(500))
    with torch.no_grad():
        head[1].weight.fill_(3.0)
        head[1].bias.fill_(-1.0)
    init_head(head)
    w = head[0].weight
    # 200k draws: the sample std of N(0, 0.02) lies within 1e-4 of 0.02 (about 3 standard errors)
    assert abs(w.std().item() - 0.02) < 1e-4 and abs(w.mean().item()) < 2e-4
    assert torch.equal(head[0].bias, torch.zeros(500))
    assert torch.equal(head[1].weight, torch.ones(500))
    assert torch.equal(head[1].bias, torch.zeros(500))
