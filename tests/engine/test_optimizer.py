"""Parameter groups follow FIBER's rule: every trainable parameter in exactly one group."""

import pytest
import torch
from torch import nn

from fiber_d2.engine.optimizer import build_fiber_optimizer, coarse_param_groups, fiber_param_groups
from fiber_d2.engine.setup import load_config


def _named(**shapes):
    m = nn.Module()
    for name, shape in shapes.items():
        parent = m
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    return m


NAMES = {
    "backbone.bottom_up.image_tower.layers.0.blocks.0.attn.qkv.weight": (6, 2),
    "backbone.bottom_up.image_tower.layers.0.blocks.0.attn.qkv.bias": (6,),
    "backbone.bottom_up.image_tower.layers.0.blocks.0.attn.relative_position_bias_table": (9, 1),
    "backbone.bottom_up.image_tower.layers.0.blocks.0.norm1.weight": (2,),
    "backbone.bottom_up.image_tower.layers.0.blocks.0.attn.qkv_i2t.weight": (2, 2),
    "backbone.bottom_up.image_tower.layers.0.blocks.0.attn.alpha_i2t": (1,),
    "backbone.bottom_up.text_tower.encoder.layer.0.attention.output.LayerNorm.weight": (2,),
    "backbone.bottom_up.text_tower.encoder.layer.0.crossattention_t2i.self.query.weight": (2, 2),
    "backbone.bottom_up.text_tower.encoder.layer.0.alpha_t2i": (1,),
    "backbone.fpn_lateral3.weight": (2, 2),
    "head.bias_lang": (4,),
    "head.bias0": (1,),
    "head.log_scale": (1,),
    "head.dyhead_tower.0.DyConv.0.bn.weight": (4,),
}


def _lr_wd(groups):
    out = {}
    for g in groups:
        for n in g["names"]:
            assert n not in out, f"{n} is in two groups"
            out[n] = (g["lr"], g["weight_decay"])
    return out


def test_fine_rule():
    m = _named(**NAMES)
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    m.register_parameter("cls_logits_weight", frozen)
    groups = fiber_param_groups(
        m,
        base_lr=1e-4,
        lang_lr=1e-5,
        backbone_body_lr_factor=0.5,
        weight_decay=0.01,
        bias_lr_factor=2.0,
        weight_decay_bias=0.0,
        weight_decay_norm_factor=1.0,
    )
    got = _lr_wd(groups)
    assert set(got) == set(NAMES)  # frozen parameter excluded, all others exactly once
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(NAMES)
    img, txt = "backbone.bottom_up.image_tower.", "backbone.bottom_up.text_tower."
    assert got[img + "layers.0.blocks.0.attn.qkv.weight"] == (5e-5, 0.01)
    assert got[img + "layers.0.blocks.0.attn.qkv.bias"] == (1e-4, 0.0)
    assert got[img + "layers.0.blocks.0.attn.relative_position_bias_table"] == (1e-4, 0.0)
    assert got[img + "layers.0.blocks.0.norm1.weight"] == (5e-5, 0.01)  # norms are decayed
    assert got[img + "layers.0.blocks.0.attn.qkv_i2t.weight"] == (5e-5, 0.01)  # image fusion
    assert got[img + "layers.0.blocks.0.attn.alpha_i2t"] == (5e-5, 0.01)  # gates decayed
    assert got[txt + "encoder.layer.0.crossattention_t2i.self.query.weight"] == (1e-5, 0.01)
    assert got[txt + "encoder.layer.0.alpha_t2i"] == (1e-5, 0.01)
    assert got["backbone.fpn_lateral3.weight"] == (1e-4, 0.01)
    assert got["head.bias_lang"] == (2e-4, 0.0)
    assert got["head.bias0"] == (2e-4, 0.0)
    assert got["head.log_scale"] == (1e-4, 0.01)


def test_coarse_rule():
    m = _named(
        **NAMES,
        **{
            "cross_modal_text_pooler.dense.weight": (2, 2),
            "mlm_score.bias": (3,),
            "temp": (1,),
            "itm_score.fc.weight": (2, 2),
        },
    )
    got = _lr_wd(coarse_param_groups(m, base_lr=1e-5, weight_decay=0.01))
    img = "backbone.bottom_up.image_tower.layers.0.blocks.0."
    assert got[img + "attn.qkv.weight"] == (1e-5, 0.01)
    assert got[img + "attn.relative_position_bias_table"] == (1e-5, 0.0)
    assert got[img + "norm1.weight"] == (1e-5, 0.0)
    assert got[img + "attn.qkv_i2t.weight"] == pytest.approx((5e-5, 0.01))
    assert got[img + "attn.alpha_i2t"] == pytest.approx((5e-5, 0.01))
    assert got["cross_modal_text_pooler.dense.weight"] == pytest.approx((5e-5, 0.01))
    assert got["mlm_score.bias"] == pytest.approx((5e-5, 0.0))
    assert got["itm_score.fc.weight"] == pytest.approx((5e-5, 0.01))
    assert got["temp"] == (1e-5, 0.01)


def test_coarse_rule_for_task_heads_and_the_query_norm():
    """Spec coarse §4: the task heads take the head multiplier (the LayerNorm inside them is
    decayed), ``norm_i2t_i`` the cross-modal one (its weight decayed, its bias not, by the "bias"
    substring)."""
    img = "backbone.image_tower.layers.2.blocks.0.attn."
    m = _named(
        **{
            "vqa_classifier.0.weight": (2, 2),
            "vqa_classifier.1.weight": (2,),
            "vqa_classifier.1.bias": (2,),
            "nlvr2_classifier.3.weight": (2, 2),
            img + "norm_i2t_i.weight": (2,),
            img + "norm_i2t_i.bias": (2,),
            "rank_output.weight": (1, 2),
        }
    )
    got = _lr_wd(
        coarse_param_groups(
            m, base_lr=1e-5, weight_decay=0.01, lr_mult_cross_modal=5.0, lr_mult_head=10.0
        )
    )
    assert got["vqa_classifier.0.weight"] == pytest.approx((1e-4, 0.01))
    assert got["vqa_classifier.1.weight"] == pytest.approx((1e-4, 0.01))
    assert got["vqa_classifier.1.bias"] == pytest.approx((1e-4, 0.0))
    assert got["nlvr2_classifier.3.weight"] == pytest.approx((1e-4, 0.01))
    assert got[img + "norm_i2t_i.weight"] == pytest.approx((5e-5, 0.01))
    assert got[img + "norm_i2t_i.bias"] == pytest.approx((5e-5, 0.0))
    assert got["rank_output.weight"] == (1e-5, 0.01)


@pytest.mark.parametrize(
    "enabled, expected",
    [
        # joint norm 5 -> scaled to 1: steps of 0.6 and 0.8 (per-parameter clipping: 1 and 1)
        ("True", [-0.6, -0.8]),
        # CLIP_TYPE "full_model" with ENABLED False clips nothing: the whole gradient
        ("False", [-3.0, -4.0]),
    ],
)
def test_full_model_clipping_clips_joint_norm_only_when_enabled(enabled, expected):
    """An SGD step of lr 1 on the gradients (3, 4) with CLIP_VALUE 1."""
    cfg = load_config(
        None,
        ["SOLVER.CLIP_GRADIENTS.ENABLED", enabled, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"]
        + ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0", "SOLVER.OPTIMIZER", "SGD"]
        + ["SOLVER.MOMENTUM", "0.0", "SOLVER.BASE_LR", "1.0", "SOLVER.WEIGHT_DECAY", "0.0"],
    )
    m = nn.Module()
    m.a = nn.Parameter(torch.zeros(1))
    m.b = nn.Parameter(torch.zeros(1))
    opt = build_fiber_optimizer(cfg, m)
    m.a.grad = torch.tensor([3.0])
    m.b.grad = torch.tensor([4.0])
    opt.step()
    assert torch.allclose(torch.cat([m.a.data, m.b.data]), torch.tensor(expected), atol=1e-5)


@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_fused_optimizer_takes_the_same_steps(optimizer):
    """SOLVER.FUSED builds torch's fused optimizer, whose steps equal the default's up to rounding."""
    models, optimizers = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
        cfg = load_config(
            None,
            ["SOLVER.OPTIMIZER", optimizer, "SOLVER.FUSED", str(fused), "SOLVER.BASE_LR", "0.01"]
            + ["SOLVER.PARAM_GROUP_RULE", "coarse", "SOLVER.WEIGHT_DECAY", "0.01"],
        )
        models.append(model)
        optimizers.append(build_fiber_optimizer(cfg, model))
    assert not optimizers[0].defaults.get("fused")
    assert optimizers[1].defaults["fused"] is True
    initial = [p.detach().clone() for p in models[0].parameters()]
    torch.manual_seed(1)
    batches = [torch.randn(4, 5) for _ in range(5)]
    for x in batches:
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b, start in zip(models[0].parameters(), models[1].parameters(), initial):
        assert (a - start).abs().max() > 1e-3  # the five steps moved every tensor
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fine_rule_decays_norms_at_their_factor():
    """Spec fine §6.2: names containing ``norm`` / ``Norm`` (and the head's ``.bn.``) decay at
    ``WEIGHT_DECAY x WEIGHT_DECAY_NORM_FACTOR``; other weights at ``WEIGHT_DECAY``, biases at 0."""
    got = _lr_wd(
        fiber_param_groups(
            _named(**NAMES),
            base_lr=1e-4,
            lang_lr=1e-5,
            weight_decay=0.01,
            weight_decay_norm_factor=0.5,
        )
    )
    img, txt = "backbone.bottom_up.image_tower.", "backbone.bottom_up.text_tower."
    assert got[img + "layers.0.blocks.0.norm1.weight"][1] == pytest.approx(0.005)
    assert got[txt + "encoder.layer.0.attention.output.LayerNorm.weight"][1] == pytest.approx(0.005)
    assert got["head.dyhead_tower.0.DyConv.0.bn.weight"][1] == pytest.approx(0.005)
    assert got[img + "layers.0.blocks.0.attn.qkv.weight"][1] == 0.01
    assert got[img + "layers.0.blocks.0.attn.alpha_i2t"][1] == 0.01  # a gate, not a norm
    assert got[img + "layers.0.blocks.0.attn.qkv.bias"][1] == 0.0


def test_coarse_rule_no_decay_substrings_and_text_side_fusion():
    """Spec coarse §4: ``LayerNorm.weight``, ``norm.weight``, ``norm1.*`` and ``norm2.*`` are not
    decayed; the text-side fusion (``t2i``) takes the cross-modal multiplier like the image side."""
    txt = "backbone.text_tower.encoder.layer.0."
    img = "backbone.image_tower.layers.0.blocks.0."
    m = _named(
        **{
            txt + "attention.output.LayerNorm.weight": (2,),
            txt + "crossattention_t2i.self.query.weight": (2, 2),
            txt + "alpha_t2i": (1,),
            img + "norm2.weight": (2,),
            img + "mlp.fc1.weight": (2, 2),
            "image_norm.weight": (2,),
        }
    )
    got = _lr_wd(coarse_param_groups(m, base_lr=1e-5, weight_decay=0.01, lr_mult_cross_modal=3.0))
    assert got[txt + "attention.output.LayerNorm.weight"] == (1e-5, 0.0)
    assert got[img + "norm2.weight"] == (1e-5, 0.0)
    assert got["image_norm.weight"] == (1e-5, 0.0)
    assert got[img + "mlp.fc1.weight"] == (1e-5, 0.01)
    assert got[txt + "crossattention_t2i.self.query.weight"] == pytest.approx((3e-5, 0.01))
    assert got[txt + "alpha_t2i"] == pytest.approx((3e-5, 0.01))


def _built(rule, opts):
    cfg = load_config(None, ["SOLVER.PARAM_GROUP_RULE", rule, *opts])
    return {
        n: (g["lr"], g["weight_decay"], g["initial_weight_decay"])
        for g in build_fiber_optimizer(cfg, _named(**NAMES, **COARSE_NAMES)).param_groups
        for n in g["names"]
    }


COARSE_NAMES = {"cross_modal_image_pooler.dense.weight": (2, 2), "itm_score.fc.weight": (2, 2)}


def test_optimizer_reads_every_solver_key_of_the_fine_rule():
    got = _built(
        "fine",
        ["SOLVER.BASE_LR", "0.001", "SOLVER.LANG_LR", "0.0001"]
        + ["SOLVER.BACKBONE_BODY_LR_FACTOR", "0.5", "SOLVER.WEIGHT_DECAY", "0.1"]
        + ["SOLVER.BIAS_LR_FACTOR", "3.0", "SOLVER.WEIGHT_DECAY_BIAS", "0.02"]
        + ["SOLVER.WEIGHT_DECAY_NORM_FACTOR", "0.5"],
    )
    img, txt = "backbone.bottom_up.image_tower.", "backbone.bottom_up.text_tower."
    assert got[img + "layers.0.blocks.0.attn.qkv.weight"][:2] == pytest.approx((5e-4, 0.1))
    assert got[img + "layers.0.blocks.0.attn.qkv.bias"][:2] == pytest.approx((1.5e-3, 0.02))
    assert got[img + "layers.0.blocks.0.norm1.weight"][:2] == pytest.approx((5e-4, 0.05))
    assert got[txt + "encoder.layer.0.alpha_t2i"][:2] == pytest.approx((1e-4, 0.1))
    assert got["head.bias0"][:2] == pytest.approx((3e-3, 0.02))
    assert got["backbone.fpn_lateral3.weight"][:2] == pytest.approx((1e-3, 0.1))


def test_optimizer_reads_the_two_multipliers_of_the_coarse_rule():
    """The NLVR2 recipe's multipliers differ (cross-modal x5, head x50): each goes to its names."""
    got = _built(
        "coarse",
        ["SOLVER.BASE_LR", "0.0001", "SOLVER.WEIGHT_DECAY", "0.01"]
        + ["SOLVER.LR_MULT_CROSS_MODAL", "5.0", "SOLVER.LR_MULT_HEAD", "50.0"],
    )
    assert got["cross_modal_image_pooler.dense.weight"][:2] == pytest.approx((5e-4, 0.01))
    assert got["itm_score.fc.weight"][:2] == pytest.approx((5e-3, 0.01))
    assert got["backbone.fpn_lateral3.weight"][:2] == pytest.approx((1e-4, 0.01))


@pytest.mark.parametrize("rule", ["fine", "coarse"])
def test_each_group_remembers_its_own_initial_weight_decay(rule):
    """The weight-decay schedule scales each group's own decay: groups without decay stay at 0."""
    got = _built(rule, ["SOLVER.WEIGHT_DECAY", "0.01", "SOLVER.WEIGHT_DECAY_BIAS", "0.0"])
    for name, (_, wd, initial) in got.items():
        assert initial == wd, name
    assert got["head.bias0"][2] == 0.0
    assert got["backbone.fpn_lateral3.weight"][2] == 0.01


def test_optimizer_reads_the_betas_eps_and_momentum():
    """SOLVER.BETAS and SOLVER.EPS reach AdamW (the coarse recipes' beta2 is 0.98, spec coarse §4,
    not torch's default 0.999), and SOLVER.MOMENTUM reaches SGD."""
    adamw = build_fiber_optimizer(
        load_config(None, ["SOLVER.BETAS", "(0.8, 0.98)", "SOLVER.EPS", "1e-6"]), _named(**NAMES)
    )
    assert isinstance(adamw, torch.optim.AdamW)
    for g in adamw.param_groups:
        assert tuple(g["betas"]) == (0.8, 0.98) and g["eps"] == 1e-6
    sgd = build_fiber_optimizer(
        load_config(None, ["SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.7"]), _named(**NAMES)
    )
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0.7 for g in sgd.param_groups)
