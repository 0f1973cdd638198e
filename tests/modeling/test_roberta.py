"""Tests of fiber_d2.modeling.backbone.roberta (FIBER's RoBERTa text tower)."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import RobertaConfig, RobertaModel

from fiber_d2.modeling.backbone.roberta import FusedRobertaLayer, RobertaTextTower

TINY = dict(
    hidden_size=32,
    num_layers=4,
    num_heads=2,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=40,
)


def _tower(attn="sdpa", **kw):
    torch.manual_seed(0)
    args = {**TINY, "image_dims": (16, 24), "attn_implementation": attn, **kw}
    return RobertaTextTower(**args).eval()


def _text(batch=2, length=9, pad_from=(9, 6)):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, start in enumerate(pad_from):
        ids[b, start:] = 1
        mask[b, start:] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_unfused_tower_equals_stock_hf_roberta(attn):
    tower = _tower(attn)
    stock = RobertaModel(tower.model.config, add_pooling_layer=False).eval()
    fusion = ("crossattention_t2i", "alpha_t2i")
    plain_state = {
        k: v for k, v in tower.model.state_dict().items() if not any(f in k for f in fusion)
    }
    stock.load_state_dict(plain_state, strict=True)
    assert stock.config._attn_implementation == attn
    ids, mask = _text()
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden, out_mask = tower(ids, mask)
    assert torch.equal(out_mask, mask)
    assert torch.equal(hidden, ref)  # same ops in the same order: bit-identical


def test_eager_and_sdpa_agree():
    ids, mask = _text()
    with torch.no_grad():
        eager, _ = _tower("eager")(ids, mask)
        sdpa, _ = _tower("sdpa")(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=1e-5)


def _ln(x, module):
    return F.layer_norm(x, x.shape[-1:], module.weight, module.bias, module.eps)


def _mha(q_in, kv_in, attn, heads, key_mask=None):
    """Plain multi-head attention with HF parameter names, written out."""
    b, t, _ = q_in.shape
    d = attn.query.weight.shape[0] // heads
    q = F.linear(q_in, attn.query.weight, attn.query.bias).view(b, t, heads, d)
    k = F.linear(kv_in, attn.key.weight, attn.key.bias).view(b, kv_in.shape[1], heads, d)
    v = F.linear(kv_in, attn.value.weight, attn.value.bias).view(b, kv_in.shape[1], heads, d)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, heads * d)


@pytest.mark.parametrize("output_norm", [True, False])
def test_fused_layer_matches_written_out_reference(output_norm):
    tower = _tower("eager")
    layer = tower.model.encoder.layer[3]
    assert isinstance(layer, FusedRobertaLayer)
    assert not hasattr(layer.crossattention_t2i.output.LayerNorm, "weight")
    assert layer.crossattention_t2i.self.key.weight.shape == (32, 24)
    assert layer.alpha_t2i.item() == 0.0
    ids, mask = _text()
    image = torch.randn(2, 11, 24)
    with torch.no_grad():
        hidden, layer_mask, _ = tower.embed(ids, mask)
        plain = tower.run_layer(3, hidden, layer_mask)
        gated_zero = tower.run_layer(3, hidden, layer_mask, image_tokens=image)
        assert torch.equal(gated_zero, plain)
        layer.alpha_t2i.fill_(-1.3)
        got = tower.run_layer(3, hidden, layer_mask, image_tokens=image, output_norm=output_norm)

        sa = layer.attention
        a = F.linear(
            _mha(hidden, hidden, sa.self, 2, mask), sa.output.dense.weight, sa.output.dense.bias
        )
        ca = layer.crossattention_t2i
        c = F.linear(_mha(a, image, ca.self, 2), ca.output.dense.weight, ca.output.dense.bias)
        u = _ln(hidden + a - 1.3 * c, sa.output.LayerNorm)
        ffn = F.linear(
            F.gelu(F.linear(u, layer.intermediate.dense.weight, layer.intermediate.dense.bias)),
            layer.output.dense.weight,
            layer.output.dense.bias,
        )
        ref = _ln(u + ffn, layer.output.LayerNorm) if output_norm else u + ffn
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_unfused_layers_reject_image_tokens():
    tower = _tower()
    ids, mask = _text()
    hidden, layer_mask, _ = tower.embed(ids, mask)
    with pytest.raises(ValueError, match="layer 0"):
        tower.run_layer(0, hidden, layer_mask, image_tokens=torch.zeros(2, 3, 16))


def test_long_text_is_truncated_with_a_warning(caplog):
    tower = _tower(max_query_len=256)  # 40 positions, pad id 1 -> at most 38 tokens
    assert tower.max_len == 38
    ids = torch.randint(3, 100, (1, 50))
    with caplog.at_level(logging.WARNING, logger="fiber_d2.modeling.backbone.roberta"):
        with torch.no_grad():
            hidden, mask = tower(ids, torch.ones(1, 50, dtype=torch.long))
    assert hidden.shape == (1, 38, 32) and mask.shape == (1, 38)
    assert any("truncating" in r.getMessage() for r in caplog.records)
    short = _tower(max_query_len=8)
    with torch.no_grad():
        assert short(ids[:, :10], torch.ones(1, 10, dtype=torch.long))[0].shape == (1, 8, 32)


def test_bad_text_shapes_raise():
    tower = _tower()
    with pytest.raises(ValueError, match="attention_mask"):
        tower(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


def test_pretrained_weights_from_local_directory(tmp_path):
    torch.manual_seed(5)
    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
    )
    stock = RobertaModel(config, add_pooling_layer=False)
    stock.save_pretrained(tmp_path)
    tower = _tower(weights=str(tmp_path))
    loaded = tower.model.state_dict()
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0)
    assert isinstance(tower.model.encoder.layer[2], FusedRobertaLayer)
    with pytest.raises(ValueError, match="hidden, layers"):
        _tower(weights=str(tmp_path), num_layers=6)


def test_freeze_and_bad_attention_implementation():
    assert not any(p.requires_grad for p in _tower(freeze=True).parameters())
    with pytest.raises(ValueError, match="flash"):
        _tower(attn="flash")


def test_position_init_scale_scales_only_the_random_position_table():
    stock, zero, half = _tower(), _tower(position_init_scale=0.0), _tower(position_init_scale=0.5)
    pos = [t.model.embeddings.position_embeddings.weight for t in (stock, zero, half)]
    assert pos[0].abs().sum() > 0
    assert torch.count_nonzero(pos[1]) == 0
    torch.testing.assert_close(pos[2], 0.5 * pos[0])
    # everything else is the same random init
    words = [t.model.embeddings.word_embeddings.weight for t in (stock, zero)]
    torch.testing.assert_close(words[0], words[1])
    # the zero table still learns: positions receive gradients
    ids, mask = _text()
    zero.train()
    zero(ids, mask)[0].square().mean().backward()
    assert zero.model.embeddings.position_embeddings.weight.grad.abs().sum() > 0


def test_position_init_scale_with_pretrained_weights_is_an_error():
    with pytest.raises(ValueError, match="random init only"):
        _tower(weights="some/roberta", position_init_scale=0.0)


def test_initializer_range_scales_every_random_matrix_and_the_cross_attention():
    stock, wide = _tower(), _tower(initializer_range=0.125)
    named = dict(wide.named_parameters())
    for name, p in stock.named_parameters():
        if p.dim() < 2 or "position_embeddings" in name:
            continue
        # the same draws, scaled by 0.125 / 0.02 (padding rows are zero in both)
        torch.testing.assert_close(named[name], p * (0.125 / 0.02), rtol=1e-4, atol=1e-6)
    cross = wide.model.encoder.layer[-1].crossattention_t2i.self.query.weight
    assert abs(cross.std().item() - 0.125) < 0.02
    # the point of the switch: at init, a self-attention sublayer's output is a few percent of its
    # input with RoBERTa's 0.02 at a small width; it grows with the square of the range
    ids, _ = _text()

    def sublayer_ratio(tower):
        layer = tower.model.encoder.layer[0]
        x = tower.model.embeddings(input_ids=ids)
        a = layer.attention.output.dense(layer.attention.self(x)[0])
        return (a.norm(dim=-1) / x.norm(dim=-1)).mean().item()

    with torch.no_grad():
        small, large = sublayer_ratio(stock), sublayer_ratio(wide)
    assert small < 0.05 and large > 20 * small


def test_initializer_range_with_pretrained_weights_is_an_error():
    with pytest.raises(ValueError, match="initializer_range 0.1 applies to a random init only"):
        _tower(weights="some/roberta", initializer_range=0.1)


def test_causal_forward_equals_hf_roberta_as_a_decoder():
    """Without image tokens the causal forward is stock HF RoBERTa with ``is_decoder`` (causal
    mask, padding masked, positions counting from pad + 1 over the real tokens), whether the
    tokens come at once or one by one through the cache, also after a padded prompt."""
    tower = _tower()
    config = copy.deepcopy(tower.model.config)
    config.is_decoder = True
    stock = RobertaModel(config, add_pooling_layer=False).eval()
    fusion = ("crossattention_t2i", "alpha_t2i")
    stock.load_state_dict(
        {k: v for k, v in tower.model.state_dict().items() if not any(f in k for f in fusion)},
        strict=True,
    )
    ids, mask = _text()
    real = mask.bool()
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        whole, _ = tower.forward_causal(ids, mask)
        cache, steps = None, []
        for t in range(ids.shape[1]):
            step, cache = tower.forward_causal(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache)
            steps.append(step[:, 0])
    torch.testing.assert_close(whole[real], ref[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1)[real], ref[real], rtol=1e-5, atol=1e-5)
    # tokens appended after a padded prompt see its real tokens only, at the next positions: the
    # outputs of the row's real tokens run alone
    extra = torch.randint(3, 100, (ids.shape[0], 2), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, cache = tower.forward_causal(ids, mask)
        after, _ = tower.forward_causal(extra, torch.ones_like(extra), cache=cache)
        for b in range(ids.shape[0]):
            alone = torch.cat([ids[b][real[b]], extra[b]])[None]
            want = stock(input_ids=alone).last_hidden_state[0, -2:]
            torch.testing.assert_close(after[b], want, rtol=1e-5, atol=1e-5, msg=str(b))
