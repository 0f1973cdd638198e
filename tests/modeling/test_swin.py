"""Tests of fiber_d2.modeling.backbone.swin (FIBER's Swin image tower)."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.swin import SwinTransformer as D2SwinTransformer
from timm.models.swin_transformer import SwinTransformerBlock

from fiber_d2.modeling.backbone.swin import FIBERSwinBlock, SwinImageTower, fused_block_dims

TINY = dict(embed_dim=16, depths=(2, 2, 4, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)


def _d2_to_tower_state(d2_state):
    """detectron2's swin.py uses the original Swin layout: merging at the END of stage i."""
    out = {}
    for key, value in d2_state.items():
        if key.endswith("relative_position_index"):
            continue
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) + 1)
        out[".".join(parts)] = value
    return out


def _tower_like_d2(window_size=7):
    torch.manual_seed(0)
    d2 = D2SwinTransformer(
        embed_dim=16,
        depths=(2, 2, 4, 2),
        num_heads=(1, 2, 2, 4),
        window_size=window_size,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3),
    ).eval()
    # give every parameter (incl. LN weights and bias tables) a distinctive random value
    with torch.no_grad():
        for p in d2.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] > 4 else 0.0))
    tower = SwinImageTower(
        **TINY, window_size=window_size, out_norm=(True, True, True, True)
    ).eval()
    tower.load_state_dict(_d2_to_tower_state(d2.state_dict()), strict=True)
    return d2, tower


def test_matches_detectron2_swin_when_stages_are_not_window_multiples():
    d2, tower = _tower_like_d2(window_size=7)
    images = torch.randn(2, 3, 128, 160)  # stage maps 32x40, 16x20, 8x10, 4x5: no multiple of 7
    with torch.no_grad():
        ref = d2(images)
        out = tower(images)
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for s in range(4):
        assert out[f"res{s + 2}"].shape == ref[f"p{s}"].shape
        torch.testing.assert_close(out[f"res{s + 2}"], ref[f"p{s}"], atol=2e-5, rtol=1e-4)


def test_fused_window_attention_gives_the_matmul_softmax_outputs_in_inference():
    """``fused_attention`` (MODEL.SWIN.FUSED_ATTENTION) runs the window self-attention through
    ``scaled_dot_product_attention`` in eval mode when no gradient is recorded: same outputs as timm's
    matmul + softmax, shifted and padded windows included; training keeps matmul + softmax."""
    _, fused = _tower_like_d2(window_size=7)
    plain = SwinImageTower(
        **TINY, window_size=7, out_norm=(True, True, True, True), fused_attention=False
    ).eval()
    plain.load_state_dict(fused.state_dict())
    images = torch.randn(2, 3, 128, 160)  # stage maps 32x40 ... 4x5: padded, shifted windows
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    with torch.no_grad():
        ref = plain(images)
    with torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention", counting_sdpa):
        out = fused(images)
    assert len(calls) == fused.num_blocks  # every block took the fused path
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5)
    calls.clear()
    with mock.patch.object(F, "scaled_dot_product_attention", counting_sdpa):
        out = fused(images)
    assert not calls  # recording gradients: matmul + softmax
    for k in ref:
        torch.testing.assert_close(out[k].detach(), ref[k], atol=1e-5, rtol=1e-5)
    fused.train()  # a training-mode forward under no_grad (inside a training step) neither
    with torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention", counting_sdpa):
        fused(images)
    assert not calls


def test_pad_then_shift_differs_from_timm_roll_then_pad():
    """The comparison above is sensitive: timm's own attention step gives other numbers here."""
    _, tower = _tower_like_d2(window_size=7)
    block = tower.block(1)  # shifted block of stage 1
    x = torch.randn(1, 10, 9, 16)
    with torch.no_grad():
        ours = block._attn(x)
        timm_order = SwinTransformerBlock._attn(block, x)
    assert (ours - timm_order).abs().max() > 1e-3


def test_drop_path_linear_over_all_blocks():
    tower = SwinImageTower(**{**TINY, "drop_path_rate": 0.4}, window_size=4)
    total = sum(TINY["depths"])
    for g in range(total):
        rate = getattr(tower.block(g).drop_path1, "drop_prob", 0.0)
        assert math.isclose(rate, 0.4 * g / (total - 1), rel_tol=1e-6, abs_tol=1e-7)


def _reference_cross_attention(block, a, text, text_mask):
    attn = block.attn
    batch, n, c = a.shape
    heads, d = attn.num_heads, c // attn.num_heads
    q_in = (
        a
        if attn.norm_i2t_i is None
        else F.layer_norm(a, (c,), attn.norm_i2t_i.weight, attn.norm_i2t_i.bias, 1e-5)
    )
    q = (q_in @ attn.qkv_i2t.weight.T + attn.qkv_i2t.bias).view(batch, n, heads, d)
    kv = text @ attn.qkv_text_i2t.weight.T + attn.qkv_text_i2t.bias
    k = kv[..., :c].reshape(batch, -1, heads, d)
    v = kv[..., c:].reshape(batch, -1, heads, d)
    scores = torch.einsum("bnhd,bthd->bhnt", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~text_mask.bool()[:, None, None, :], float("-inf"))
    out = torch.einsum("bhnt,bthd->bnhd", scores.softmax(-1), v).reshape(batch, n, c)
    return out @ attn.proj_i2t.weight.T + attn.proj_i2t.bias


@pytest.mark.parametrize("query_norm", [False, True])
def test_fused_block_adds_gated_cross_attention_to_self_attention_output(query_norm):
    torch.manual_seed(1)
    block = FIBERSwinBlock(
        dim=16, num_heads=2, window_size=4, shift_size=2, text_dim=12, query_norm=query_norm
    ).eval()
    assert (block.attn.norm_i2t_i is not None) == query_norm
    assert block.attn.alpha_i2t.shape == (1,) and block.attn.alpha_i2t.item() == 0.0
    assert block.attn.qkv_text_i2t.weight.shape == (32, 12)
    x = torch.randn(2, 6, 5, 16)
    text = torch.randn(2, 7, 12)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        plain = block(x)
        assert torch.equal(block(x, text, text_mask), plain)  # gate 0: exactly the plain block
        block.attn.alpha_i2t.fill_(0.7)
        if query_norm:
            block.attn.norm_i2t_i.weight.normal_()
        got = block(x, text, text_mask)
        a = block._attn(block.norm1(x)).reshape(2, 30, 16)
        ca = _reference_cross_attention(block, a, text, text_mask)
        y = x + (a + 0.7 * ca).view(2, 6, 5, 16)
        y = y + block.mlp(block.norm2(y))
        torch.testing.assert_close(got, y, atol=1e-5, rtol=1e-5)
        assert (got - plain).abs().max() > 1e-3
        # padded text tokens are invisible
        text2 = text.clone()
        text2[1, 4:] = torch.randn(3, 12) * 5
        torch.testing.assert_close(block(x, text2, text_mask), got, atol=1e-6, rtol=0)


def test_freeze_at():
    def frozen(tower):
        return {n for n, p in tower.named_parameters() if not p.requires_grad}

    assert not frozen(SwinImageTower(**TINY, window_size=4, freeze_at=-1))
    assert frozen(SwinImageTower(**TINY, window_size=4, freeze_at=0)) == {
        n
        for n, _ in SwinImageTower(**TINY, window_size=4).named_parameters()
        if n.startswith("patch_embed.")
    }
    tower = SwinImageTower(**TINY, window_size=4, freeze_at=1)
    names = frozen(tower)
    assert any(n.startswith("layers.0.blocks.") for n in names)
    # the original ends stage 1 with its patch merging, which timm places at layers.1.downsample
    assert "layers.1.downsample.reduction.weight" in names
    assert not any(n.startswith("layers.1.blocks.") for n in names)
    tower.train()
    assert not tower.layers[0].training and tower.layers[1].blocks.training


@pytest.mark.parametrize("size", [(60, 96), (64, 100), (2, 2)])
def test_bad_image_size_names_the_size(size):
    tower = SwinImageTower(**TINY, window_size=4)
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        tower(torch.zeros(1, 3, *size))


def test_fused_block_dims_and_out_shapes():
    assert fused_block_dims(128, (2, 2, 18, 2), 6) == [512] * 4 + [1024] * 2
    with pytest.raises(ValueError):
        fused_block_dims(16, (2, 2), 5)
    tower = SwinImageTower(**TINY, window_size=4, out_features=("res3", "res5"))
    assert {k: (v.channels, v.stride) for k, v in tower.output_shape().items()} == {
        "res3": (32, 8),
        "res5": (128, 32),
    }
    assert set(tower(torch.zeros(1, 3, 64, 64))) == {"res3", "res5"}
    with pytest.raises(KeyError, match="res9"):
        SwinImageTower(**TINY, window_size=4, out_features=("res9",))


def test_imagenet_checkpoint_loading(tmp_path):
    d2, _ = _tower_like_d2(window_size=7)
    state = {
        k: v for k, v in d2.state_dict().items() if not k.startswith(("norm0", "norm1", "norm2"))
    }
    state = {
        ("norm." + k[len("norm3.") :] if k.startswith("norm3.") else k): v for k, v in state.items()
    }
    state["head.weight"] = torch.zeros(5, 128)
    state["head.bias"] = torch.zeros(5)
    path = tmp_path / "swin.pth"
    torch.save({"model": state}, path)
    tower = SwinImageTower(**TINY, window_size=7, out_norm=(False, False, False, True)).eval()
    missing, unexpected = tower.load_imagenet_checkpoint(str(path))
    assert not missing and not unexpected
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(tower(images)["res5"], d2(images)["p3"], atol=2e-5, rtol=1e-4)


def test_imagenet_layout_export_round_trips_through_the_weights_argument(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(TINY, window_size=4, num_fusion_blocks=2, text_dim=16)
    source = SwinImageTower(**kwargs).eval()
    state = source.imagenet_state_dict()
    # the original layout: merging at the end of its stage, no fusion modules, no buffers
    assert "layers.0.downsample.reduction.weight" in state
    assert not any(k.startswith("layers.3.downsample") for k in state)
    assert not any("_i2t" in k or "relative_position_index" in k for k in state)
    path = tmp_path / "swin.pth"
    torch.save({"model": state}, path)
    torch.manual_seed(1)
    loaded = SwinImageTower(**kwargs, weights=str(path)).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for name, value in source(images).items():
            assert torch.equal(loaded(images)[name], value), name


def test_shift_single_window_false_leaves_a_map_that_fits_one_window_unshifted():
    """The coarse stage's classification Swin does not shift a map no larger than its window."""
    torch.manual_seed(2)
    kwargs = dict(dim=16, num_heads=2, window_size=4)
    shifted = FIBERSwinBlock(**kwargs, shift_size=2).eval()
    coarse = FIBERSwinBlock(**kwargs, shift_size=2, shift_single_window=False).eval()
    unshifted = FIBERSwinBlock(**kwargs, shift_size=0).eval()
    coarse.load_state_dict(shifted.state_dict())
    unshifted.load_state_dict(shifted.state_dict())
    fits, larger = torch.randn(2, 4, 4, 16), torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(coarse(fits), unshifted(fits), atol=0, rtol=0)
        assert (shifted(fits) - unshifted(fits)).abs().max() > 1e-3  # the shift matters here
        torch.testing.assert_close(coarse(larger), shifted(larger), atol=0, rtol=0)


def test_freeze_at_the_top_stages_freezes_their_patch_merging():
    depths = len(TINY["depths"])
    for freeze_at in (depths - 1, depths):
        tower = SwinImageTower(**TINY, window_size=4, freeze_at=freeze_at)
        trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
        # stage freeze_at - 1 ends with the merging timm puts in front of stage freeze_at
        assert not any(n.startswith(f"layers.{depths - 1}.downsample.") for n in trainable)
        blocks = {n.split(".")[1] for n in trainable if n.startswith("layers.")}
        assert blocks == ({str(depths - 1)} if freeze_at < depths else set())


def test_drop_path_covers_the_gated_fusion_term():
    """Stochastic depth drops the whole attention branch, SA + alpha * CA (coarse spec §1.1)."""
    torch.manual_seed(3)
    block = FIBERSwinBlock(
        dim=16, num_heads=2, window_size=4, shift_size=0, text_dim=12, drop_path=1.0
    ).train()
    with torch.no_grad():
        block.attn.alpha_i2t.fill_(0.5)
    x, text = torch.randn(2, 4, 4, 16), torch.randn(2, 3, 12)
    with torch.no_grad():
        out = block(x, text, torch.ones(2, 3))
    # both residual branches dropped with probability 1: the block is the identity
    torch.testing.assert_close(out, x, atol=0, rtol=0)


def test_size_divisibility_strides_and_norms_follow_the_tower_layout():
    tower = SwinImageTower(**TINY, window_size=4)
    assert tower.size_divisibility == 4 * 2**3
    with pytest.raises(ValueError, match="48x64"):
        tower(torch.zeros(1, 3, 48, 64))  # multiples of 16, not of 32: the last merging is odd
    three = SwinImageTower(
        patch_size=2,
        embed_dim=8,
        depths=(2, 2, 2),
        num_heads=(1, 1, 2),
        window_size=4,
        out_norm=(True, True, True),
        out_features=("res2", "res4"),
    )
    assert three.size_divisibility == 2 * 2**2
    shapes = three.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (8, 2),
        "res4": (32, 8),
    }
    out = three(torch.zeros(1, 3, 24, 32))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {"res2": (12, 16), "res4": (3, 4)}
    # a stage that is not returned gets no output norm (no unused parameters)
    assert isinstance(three.norm1, torch.nn.Identity)
    assert isinstance(three.norm2, torch.nn.LayerNorm)
