"""Tests of fiber_d2.modeling.backbone.fused (the lock-step fusion of both towers)."""

import pytest
import torch

from fiber_d2.modeling.backbone.fused import FusedSwinRoberta, FusionPrefix, FusionStep
from fiber_d2.modeling.backbone.roberta import RobertaTextTower
from fiber_d2.modeling.backbone.swin import SwinImageTower


def _backbone(num_fusion=3, use_checkpoint=False, drop=0.0, seed=0, checkpoint_cross=False):
    """Tiny towers; 3 fused pairs so the schedule crosses the stage-3 -> stage-4 patch merging."""
    torch.manual_seed(seed)
    image = SwinImageTower(
        embed_dim=16,
        depths=(2, 2, 4, 2),
        num_heads=(1, 2, 2, 4),
        window_size=4,
        drop_path_rate=drop,
        num_fusion_blocks=num_fusion,
        text_dim=32,
        use_checkpoint=use_checkpoint,
    )
    text = RobertaTextTower(
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=40,
        hidden_dropout=drop,
        attention_dropout=drop,
        image_dims=image.fused_block_dims,
        use_checkpoint=use_checkpoint,
        checkpoint_cross_attention=checkpoint_cross,
    )
    return FusedSwinRoberta(image_tower=image, text_tower=text)


def _set_gates(model, i2t=None, t2i=None):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha_i2t") and i2t is not None:
                p.fill_(i2t)
            if name.endswith("alpha_t2i") and t2i is not None:
                p.fill_(t2i)


def _inputs(height=64, width=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, height, width, generator=g)
    ids = torch.randint(3, 100, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    ids[1, 5:], mask[1, 5:] = 1, 0
    return images, ids, mask


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_schedule_pairs_top_blocks_with_top_layers():
    model = _backbone()
    assert model.schedule == [
        FusionStep(image_block=7, stage=2, block=3, text_layer=1),
        FusionStep(image_block=8, stage=3, block=0, text_layer=2),
        FusionStep(image_block=9, stage=3, block=1, text_layer=3),
    ]
    # the text layers after the patch merging read the merged (wider) tokens
    layers = model.text_tower.model.encoder.layer
    assert [layers[j].crossattention_t2i.self.key.in_features for j in (1, 2, 3)] == [64, 128, 128]


def test_zero_gates_equal_unfused_towers_exactly():
    model = _backbone().eval()
    images, ids, mask = _inputs()
    with torch.no_grad():
        fused_img, fused_txt = model(images, ids, mask)
        plain_img, plain_txt = model(images, ids, mask, fuse=False)
        _assert_same(fused_img, plain_img)
        _assert_same(fused_txt, plain_txt)
        _assert_same(plain_img, model.forward_image(images))
        _assert_same(plain_txt, model.forward_text(ids, mask))
    assert list(fused_img) == ["res2", "res3", "res4", "res5"]
    assert fused_img["res4"].shape == (2, 64, 4, 6) and fused_txt["hidden"].shape == (2, 8, 32)


def test_each_gate_changes_only_its_own_side():
    model = _backbone().eval()
    images, ids, mask = _inputs()
    with torch.no_grad():
        plain_img, plain_txt = model(images, ids, mask, fuse=False)
        _set_gates(model, i2t=0.5)
        img, txt = model(images, ids, mask)
        assert torch.equal(img["res2"], plain_img["res2"]) and torch.equal(
            img["res3"], plain_img["res3"]
        )
        assert (img["res4"] - plain_img["res4"]).abs().max() > 1e-3  # stage-3 block 3 is fused
        assert (img["res5"] - plain_img["res5"]).abs().max() > 1e-3
        assert torch.equal(txt["hidden"], plain_txt["hidden"])
        _set_gates(model, i2t=0.0, t2i=0.5)
        img, txt = model(images, ids, mask)
        _assert_same(img, plain_img)
        assert (txt["hidden"] - plain_txt["hidden"]).abs().max() > 1e-3
        _set_gates(model, i2t=0.5)
        # fuse=False ignores the gates entirely
        _assert_same(model(images, ids, mask, fuse=False)[0], plain_img)


def test_lock_step_update_reads_pre_step_states():
    """A written-out schedule: every pair reads the partner's state from *before* the step."""
    model = _backbone().eval()
    _set_gates(model, i2t=0.7, t2i=-0.9)
    images, ids, mask = _inputs()
    image, text = model.image_tower, model.text_tower
    with torch.no_grad():
        got_img, got_txt = model(images, ids, mask)
        x = image.patch_embed(images)
        for g in range(7):
            s, b = image.block_position(g)
            if b == 0 and s > 0:
                x = image.layers[s].downsample(x)
            x = image.block(g)(x)
        hidden, layer_mask, _ = text.embed(ids, mask)
        hidden = text.model.encoder.layer[0](hidden, layer_mask)
        for g, j in ((7, 1), (8, 2), (9, 3)):
            if g == 8:
                x = image.layers[3].downsample(x)
            x, hidden = (
                image.block(g)(x, hidden, mask),
                text.model.encoder.layer[j](hidden, layer_mask, x.flatten(1, 2)),
            )
    torch.testing.assert_close(got_img["res5"], image.norm3(x).permute(0, 3, 1, 2), atol=0, rtol=0)
    torch.testing.assert_close(got_txt["hidden"], hidden, atol=0, rtol=0)


def test_padded_text_tokens_change_nothing():
    model = _backbone().eval()
    _set_gates(model, i2t=0.6, t2i=0.6)
    images, ids, mask = _inputs()
    other = ids.clone()
    other[1, 5:] = torch.tensor([7, 42, 99])
    with torch.no_grad():
        img_a, txt_a = model(images, ids, mask)
        img_b, txt_b = model(images, other, mask)
    for k in img_a:
        torch.testing.assert_close(img_a[k], img_b[k], atol=1e-6, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(txt_a["hidden"][real], txt_b["hidden"][real], atol=1e-6, rtol=0)


def test_image_reaches_text_only_from_first_fused_layer():
    model = _backbone().eval()
    _set_gates(model, i2t=0.6, t2i=0.6)
    images, ids, mask = _inputs()
    images_2 = images + torch.randn_like(images)
    with torch.no_grad():
        prefix_a = model.forward_prefix(images, ids, mask)
        prefix_b = model.forward_prefix(images_2, ids, mask)
        assert torch.equal(prefix_a.text, prefix_b.text)  # text layer 0 never sees the image
        assert not torch.equal(prefix_a.image, prefix_b.image)
        txt_a = model.forward_fused(prefix_a)[1]["hidden"]
        txt_b = model.forward_fused(prefix_b)[1]["hidden"]
    assert (txt_a - txt_b).abs().max() > 1e-3


def test_two_image_sizes_in_consecutive_calls():
    model = _backbone().eval()
    _set_gates(model, i2t=0.3, t2i=0.3)
    wide, ids, mask = _inputs(64, 96)
    tall, _, _ = _inputs(96, 64)
    with torch.no_grad():
        first = model(wide, ids, mask)[0]
        other = model(tall, ids, mask)[0]
        again = model(wide, ids, mask)[0]
    assert other["res2"].shape == (2, 16, 24, 16) and other["res5"].shape == (2, 128, 3, 2)
    _assert_same(first, again)


def _loss_and_grads(use_checkpoint, checkpoint_cross=False):
    model = _backbone(use_checkpoint=use_checkpoint, drop=0.1, checkpoint_cross=checkpoint_cross)
    model.train()
    _set_gates(model, i2t=0.4, t2i=0.4)
    images, ids, mask = _inputs()
    torch.manual_seed(123)
    img, txt = model(images, ids, mask)
    loss = sum((v**2).mean() for v in img.values()) + (txt["hidden"] ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_same_loss_and_gradients():
    loss_a, grads_a = _loss_and_grads(False)
    loss_b, grads_b = _loss_and_grads(True)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, name
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


def _cross_checkpoint_grads(checkpoint_cross):
    """Loss and gradients of a projection of every output (gradients of order 1)."""
    model = _backbone(drop=0.1, checkpoint_cross=checkpoint_cross).train()
    _set_gates(model, i2t=0.4, t2i=0.4)
    images, ids, mask = _inputs()
    torch.manual_seed(123)
    img, txt = model(images, ids, mask)
    g = torch.Generator().manual_seed(7)
    outputs = [*img.values(), txt["hidden"]]
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_cross_attention_checkpointing_gives_same_loss_and_gradients():
    """The fused text layers' cross-attention recomputed in the backward pass (dropout 0.1: the
    recomputation must draw the same masks): loss and every gradient equal at 1e-6."""
    loss_a, grads_a = _cross_checkpoint_grads(False)
    loss_b, grads_b = _cross_checkpoint_grads(True)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    cross = [n for n in grads_a if "crossattention_t2i" in n and n.endswith("value.weight")]
    assert cross and all(grads_a[n].abs().max() > 1e-2 for n in cross)  # gradients of order 1
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-6)


def test_cross_attention_checkpoint_follows_the_config():
    from detectron2.config import get_cfg

    from fiber_d2 import add_fiber_config

    cfg = add_fiber_config(get_cfg())
    for flag in (True, False):
        cfg.MODEL.LANGUAGE_BACKBONE.CHECKPOINT_CROSS_ATTENTION = flag
        kwargs = RobertaTextTower.from_config(cfg)
        assert kwargs["checkpoint_cross_attention"] is flag
    tower = _backbone(checkpoint_cross=True).text_tower
    fused = [tower.model.encoder.layer[j] for j in tower.fused_layer_ids]
    assert fused and all(layer.checkpoint_cross_attention for layer in fused)


def test_mismatched_batch_sizes_raise():
    model = _backbone()
    images, ids, mask = _inputs()
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(images[:1], ids, mask)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(images, ids, mask[:1])


def test_fused_last_image_norm_off_skips_only_the_last_output_norm():
    model = _backbone().eval()  # zero gates: the fused outputs are the unfused ones
    model.fused_last_image_norm = False
    images, ids, mask = _inputs()
    with torch.no_grad():
        fused, _ = model(images, ids, mask, fuse=True)
        normed = model.forward_image(images)
        tower = model.image_tower
        last_norm, tower.norm3 = tower.norm3, torch.nn.Identity()
        try:
            raw = model.forward_image(images)
        finally:
            tower.norm3 = last_norm
    assert isinstance(last_norm, torch.nn.LayerNorm)
    torch.testing.assert_close(fused["res5"], raw["res5"])
    assert (fused["res5"] - normed["res5"]).abs().max() > 1e-2
    for name in ("res2", "res3", "res4"):
        torch.testing.assert_close(fused[name], normed[name])


def test_fusion_enabled_false_makes_forward_unfused_by_default():
    model = _backbone().eval()
    _set_gates(model, i2t=0.5, t2i=0.5)
    model.fusion_enabled = False
    images, ids, mask = _inputs()
    with torch.no_grad():
        default_image, default_text = model(images, ids, mask)
        plain_image, plain_text = model(images, ids, mask, fuse=False)
        fused_image, _ = model(images, ids, mask, fuse=True)
    _assert_same(default_image, plain_image)
    _assert_same(default_text, plain_text)
    assert (default_image["res5"] - fused_image["res5"]).abs().max() > 1e-3


def test_prefix_select_takes_image_rows_for_the_image_and_text_rows_for_the_text():
    images, texts, t = 3, 2, 4
    prefix = FusionPrefix(
        image=torch.arange(images, dtype=torch.float).view(images, 1, 1, 1),
        text=torch.arange(texts, dtype=torch.float).view(texts, 1, 1),
        text_layer_mask=torch.arange(texts, dtype=torch.float)
        .view(texts, 1, 1, 1)
        .expand(texts, 1, t, t),
        attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        image_outputs={"res3": torch.arange(images, dtype=torch.float).view(images, 1, 1, 1)},
    )
    image_rows, text_rows = torch.tensor([2, 0, 1]), torch.tensor([1, 1, 0])
    picked = prefix.select(image_rows, text_rows)
    assert picked.image.flatten().tolist() == [2, 0, 1]
    assert picked.image_outputs["res3"].flatten().tolist() == [2, 0, 1]
    assert picked.text.flatten().tolist() == [1, 1, 0]
    assert picked.text_layer_mask[:, 0, 0, 0].tolist() == [1, 1, 0]
    assert picked.attention_mask.sum(dim=1).tolist() == [2, 2, 4]
