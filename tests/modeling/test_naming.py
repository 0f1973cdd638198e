"""Tests of fiber_d2.modeling.backbone.naming (original FIBER keys -> fiber_d2 keys).

The original layouts are generated here from the spec tables (fine §7.2, coarse §6.2), with the
shapes the spec gives, and must load into fiber_d2's modules with strict matching.
"""

import torch

from fiber_d2.modeling.backbone.fpn import FIBERFPN
from fiber_d2.modeling.backbone.fused import FusedSwinRoberta
from fiber_d2.modeling.backbone.naming import original_to_fiber_d2_key
from fiber_d2.modeling.backbone.roberta import RobertaTextTower
from fiber_d2.modeling.backbone.swin import SwinImageTower

EMBED, DEPTHS, HEADS, WINDOW = 16, (2, 2, 2, 2), (1, 2, 2, 4), 4
TEXT, INTER, VOCAB, POS, FPN_OUT = 32, 64, 100, 40, 16


def _towers(num_text_layers, num_fusion, **image_kw):
    image = SwinImageTower(
        embed_dim=EMBED,
        depths=DEPTHS,
        num_heads=HEADS,
        window_size=WINDOW,
        num_fusion_blocks=num_fusion,
        text_dim=TEXT,
        **image_kw,
    )
    text = RobertaTextTower(
        hidden_size=TEXT,
        num_layers=num_text_layers,
        num_heads=2,
        intermediate_size=INTER,
        vocab_size=VOCAB,
        max_position_embeddings=POS,
        image_dims=image.fused_block_dims,
    )
    return FusedSwinRoberta(image_tower=image, text_tower=text)


def _swin_keys(root, num_fusion, query_norm, coarse):
    keys = {
        root + "patch_embed.proj.weight": (EMBED, 3, 4, 4),
        root + "patch_embed.proj.bias": (EMBED,),
        root + "patch_embed.norm.weight": (EMBED,),
        root + "patch_embed.norm.bias": (EMBED,),
    }
    total, g, widths = sum(DEPTHS), 0, []
    for s, depth in enumerate(DEPTHS):
        c = EMBED * 2**s
        for b in range(depth):
            p = f"{root}layers.{s}.blocks.{b}."
            keys.update(
                {p + n: (c,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
            )
            keys.update({p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,)})
            keys.update({p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)})
            keys[p + "attn.relative_position_bias_table"] = ((2 * WINDOW - 1) ** 2, HEADS[s])
            keys[p + "attn.relative_position_index"] = (WINDOW**2, WINDOW**2)
            keys.update({p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,)})
            keys.update({p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})
            if coarse and b % 2 == 1 and s < 3:
                keys[p + "attn_mask"] = (1, WINDOW**2, WINDOW**2)
            if g >= total - num_fusion:
                widths.append(c)
                keys.update(
                    {
                        p + "attn.qkv_text_i2t.weight": (2 * c, TEXT),
                        p + "attn.qkv_text_i2t.bias": (2 * c,),
                    }
                )
                keys.update({p + "attn.qkv_i2t.weight": (c, c), p + "attn.qkv_i2t.bias": (c,)})
                keys.update({p + "attn.proj_i2t.weight": (c, c), p + "attn.proj_i2t.bias": (c,)})
                keys[p + "attn.alpha_i2t"] = (1,)
                if query_norm:
                    keys.update(
                        {p + "attn.norm_i2t_i.weight": (c,), p + "attn.norm_i2t_i.bias": (c,)}
                    )
            g += 1
        if s < len(DEPTHS) - 1:
            keys[f"{root}layers.{s}.downsample.reduction.weight"] = (2 * c, 4 * c)
            keys[f"{root}layers.{s}.downsample.norm.weight"] = (4 * c,)
            keys[f"{root}layers.{s}.downsample.norm.bias"] = (4 * c,)
    if coarse:
        keys.update({root + "norm.weight": (8 * EMBED,), root + "norm.bias": (8 * EMBED,)})
    else:
        for s in (1, 2, 3):
            keys.update(
                {f"{root}norm{s}.weight": (EMBED * 2**s,), f"{root}norm{s}.bias": (EMBED * 2**s,)}
            )
    return keys, widths


def _roberta_keys(root, num_layers, widths, coarse):
    keys = {
        root + "embeddings.word_embeddings.weight": (VOCAB, TEXT),
        root + "embeddings.position_embeddings.weight": (POS, TEXT),
        root + "embeddings.token_type_embeddings.weight": (1, TEXT),
        root + "embeddings.LayerNorm.weight": (TEXT,),
        root + "embeddings.LayerNorm.bias": (TEXT,),
        root + "embeddings.position_ids": (1, POS),
    }
    first = num_layers - len(widths)
    for j in range(num_layers):
        p = f"{root}encoder.layer.{j}."
        for n in ("query", "key", "value"):
            keys.update(
                {
                    f"{p}attention.self.{n}.weight": (TEXT, TEXT),
                    f"{p}attention.self.{n}.bias": (TEXT,),
                }
            )
        keys.update(
            {
                p + "attention.output.dense.weight": (TEXT, TEXT),
                p + "attention.output.dense.bias": (TEXT,),
            }
        )
        keys.update(
            {
                p + "attention.output.LayerNorm.weight": (TEXT,),
                p + "attention.output.LayerNorm.bias": (TEXT,),
            }
        )
        keys.update(
            {
                p + "intermediate.dense.weight": (INTER, TEXT),
                p + "intermediate.dense.bias": (INTER,),
            }
        )
        keys.update({p + "output.dense.weight": (TEXT, INTER), p + "output.dense.bias": (TEXT,)})
        keys.update({p + "output.LayerNorm.weight": (TEXT,), p + "output.LayerNorm.bias": (TEXT,)})
        if coarse or j >= first:
            keys[p + "alpha_t2i"] = (1,)
        if j >= first:
            c = widths[j - first]
            q = p + "crossattention_t2i."
            keys.update({q + "self.query.weight": (TEXT, TEXT), q + "self.query.bias": (TEXT,)})
            keys.update({q + "self.key.weight": (TEXT, c), q + "self.key.bias": (TEXT,)})
            keys.update({q + "self.value.weight": (TEXT, c), q + "self.value.bias": (TEXT,)})
            keys.update({q + "output.dense.weight": (TEXT, TEXT), q + "output.dense.bias": (TEXT,)})
            if coarse:  # unused LayerNorm present only in coarse checkpoints
                keys.update(
                    {q + "output.LayerNorm.weight": (TEXT,), q + "output.LayerNorm.bias": (TEXT,)}
                )
    if coarse:
        keys.update(
            {root + "pooler.dense.weight": (TEXT, TEXT), root + "pooler.dense.bias": (TEXT,)}
        )
    return keys


def _random_state(shapes):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def test_single_keys():
    fine = "module.fusion_backbone.backbone."
    assert original_to_fiber_d2_key(fine + "body.layers.2.downsample.reduction.weight") == (
        "backbone.bottom_up.image_tower.layers.3.downsample.reduction.weight"
    )
    assert original_to_fiber_d2_key(fine + "body.layers.2.blocks.14.attn.alpha_i2t") == (
        "backbone.bottom_up.image_tower.layers.2.blocks.14.attn.alpha_i2t"
    )
    assert (
        original_to_fiber_d2_key(fine + "body.layers.0.blocks.1.attn.relative_position_index")
        is None
    )
    assert (
        original_to_fiber_d2_key(fine + "fpn.fpn_inner2.weight") == "backbone.fpn_lateral3.weight"
    )
    assert original_to_fiber_d2_key(fine + "fpn.fpn_layer4.bias") == "backbone.fpn_output5.bias"
    assert (
        original_to_fiber_d2_key(fine + "fpn.top_blocks.p7.weight")
        == "backbone.top_block.p7.weight"
    )
    lang = "fusion_backbone.language_backbone.body.model.encoder.layer.10."
    assert original_to_fiber_d2_key(lang + "crossattention_t2i.self.key.weight") == (
        "backbone.bottom_up.text_tower.model.encoder.layer.10.crossattention_t2i.self.key.weight"
    )
    assert original_to_fiber_d2_key("rpn.head.bias0") is None
    assert (
        original_to_fiber_d2_key("vit_model.norm.weight", backbone_prefix="")
        == "image_tower.norm3.weight"
    )
    assert original_to_fiber_d2_key("vit_model.norm.bias", final_norm="image_norm") == (
        "image_norm.bias"
    )
    assert original_to_fiber_d2_key("text_transformer.encoder.layer.3.alpha_t2i") is None
    assert original_to_fiber_d2_key("text_transformer.encoder.layer.6.alpha_t2i") == (
        "backbone.bottom_up.text_tower.model.encoder.layer.6.alpha_t2i"
    )
    assert original_to_fiber_d2_key("text_transformer.pooler.dense.weight") is None
    assert original_to_fiber_d2_key("itm_score.fc.weight") is None


def test_fine_layout_loads_strictly_into_the_fpn_backbone():
    torch.manual_seed(0)
    model = FIBERFPN(bottom_up=_towers(2, 2), out_channels=FPN_OUT)
    shapes, widths = _swin_keys("fusion_backbone.backbone.body.", 2, query_norm=False, coarse=False)
    shapes.update(
        _roberta_keys("fusion_backbone.language_backbone.body.model.", 2, widths, coarse=False)
    )
    # fpn_inner{2,3,4} read the stride 8/16/32 Swin outputs (widths 2, 4, 8 x EMBED)
    for k in (2, 3, 4):
        cin = EMBED * 2 ** (k - 1)
        shapes[f"fusion_backbone.backbone.fpn.fpn_inner{k}.weight"] = (FPN_OUT, cin, 1, 1)
        shapes[f"fusion_backbone.backbone.fpn.fpn_inner{k}.bias"] = (FPN_OUT,)
        shapes[f"fusion_backbone.backbone.fpn.fpn_layer{k}.weight"] = (FPN_OUT, FPN_OUT, 3, 3)
        shapes[f"fusion_backbone.backbone.fpn.fpn_layer{k}.bias"] = (FPN_OUT,)
    for p in ("p6", "p7"):
        shapes[f"fusion_backbone.backbone.fpn.top_blocks.{p}.weight"] = (FPN_OUT, FPN_OUT, 3, 3)
        shapes[f"fusion_backbone.backbone.fpn.top_blocks.{p}.bias"] = (FPN_OUT,)
    shapes["rpn.head.log_scale"] = (1,)
    original = _random_state(shapes)
    mapped, dropped = {}, []
    for key, value in original.items():
        new = original_to_fiber_d2_key(
            "module." + key,
            backbone_prefix="bottom_up.",
            fpn_prefix="",
            num_text_layers=2,
            num_fusion_layers=2,
        )
        if new is None:
            dropped.append(key)
        else:
            mapped[new] = value
    model.load_state_dict(mapped, strict=True)
    assert len(dropped) == sum(DEPTHS) + 2  # relative_position_index buffers, position_ids, rpn key
    block = model.bottom_up.image_tower.block(sum(DEPTHS) - 1)
    assert torch.equal(
        block.attn.qkv_text_i2t.weight,
        original["fusion_backbone.backbone.body.layers.3.blocks.1.attn.qkv_text_i2t.weight"],
    )
    assert torch.equal(
        model.bottom_up.image_tower.layers[1].downsample.reduction.weight,
        original["fusion_backbone.backbone.body.layers.0.downsample.reduction.weight"],
    )


def test_coarse_layout_loads_strictly_into_the_fused_backbone():
    torch.manual_seed(0)
    model = _towers(4, 2, i2t_query_norm=True, out_norm=(False, False, False, True))
    shapes, widths = _swin_keys("vit_model.", 2, query_norm=True, coarse=True)
    shapes.update(_roberta_keys("text_transformer.", 4, widths, coarse=True))
    shapes["cross_modal_text_transform.weight"] = (TEXT, TEXT)
    original = _random_state(shapes)
    mapped = {}
    for key, value in original.items():
        new = original_to_fiber_d2_key(
            key, backbone_prefix="", num_text_layers=4, num_fusion_layers=2
        )
        if new is not None:
            mapped[new] = value
    model.load_state_dict(mapped, strict=True)
    assert torch.equal(model.image_tower.norm3.weight, original["vit_model.norm.weight"])
