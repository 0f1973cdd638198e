"""Tests of fiber_d2.modeling.backbone.fpn (FIBER's FPN, DropBlock and backbone builder)."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import fiber_d2
from fiber_d2.modeling.backbone.fpn import FIBERFPN, DropBlock2d
from fiber_d2.modeling.backbone.fused import FusedSwinRoberta
from fiber_d2.modeling.backbone.roberta import RobertaTextTower
from fiber_d2.modeling.backbone.swin import SwinImageTower


def _fpn(drop_block=True):
    torch.manual_seed(0)
    image = SwinImageTower(
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4),
        window_size=4,
        drop_path_rate=0.0,
        num_fusion_blocks=2,
        text_dim=32,
    )
    text = RobertaTextTower(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=40,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        image_dims=image.fused_block_dims,
    )
    bottom_up = FusedSwinRoberta(image_tower=image, text_tower=text)
    with torch.no_grad():
        for name, p in bottom_up.named_parameters():
            if "alpha" in name:
                p.fill_(0.5)
    return FIBERFPN(bottom_up=bottom_up, out_channels=32, drop_block=drop_block)


def _inputs():
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 96, 64, generator=g)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    ids[1, 4:] = 1
    return images, ids, mask


def test_fpn_matches_written_out_reference():
    fpn = _fpn().eval()
    images, ids, mask = _inputs()
    with torch.no_grad():
        feats, text = fpn(images, ids, mask)
        c, t = fpn.bottom_up(images, ids, mask)

        def conv(name, x, stride=1):
            m = dict(fpn.named_modules())[name]
            return F.conv2d(x, m.weight, m.bias, stride=stride, padding=m.weight.shape[-1] // 2)

        inner5 = conv("fpn_lateral5", c["res5"])
        inner4 = conv("fpn_lateral4", c["res4"]) + F.interpolate(inner5, size=c["res4"].shape[-2:])
        inner3 = conv("fpn_lateral3", c["res3"]) + F.interpolate(inner4, size=c["res3"].shape[-2:])
        p5 = conv("fpn_output5", inner5)
        p6 = conv("top_block.p6", p5, stride=2)
        ref = {
            "p3": conv("fpn_output3", inner3),
            "p4": conv("fpn_output4", inner4),
            "p5": p5,
            "p6": p6,
            "p7": conv("top_block.p7", F.relu(p6), stride=2),
        }
    assert list(feats) == ["p3", "p4", "p5", "p6", "p7"]
    for k in ref:
        torch.testing.assert_close(feats[k], ref[k], atol=1e-5, rtol=1e-5)
    assert [feats[k].shape[-2:] for k in feats] == [(12, 8), (6, 4), (3, 2), (2, 1), (1, 1)]
    assert torch.equal(text["hidden"], t["hidden"]) and torch.equal(text["mask"], mask)
    torch.testing.assert_close(text["embedded"], t["hidden"] * mask[..., None], atol=0, rtol=0)
    assert torch.all(text["embedded"][1, 4:] == 0)
    assert fpn.size_divisibility == 32
    assert {k: v.stride for k, v in fpn.output_shape().items()} == {
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
        "p7": 128,
    }


def test_drop_block_only_in_training_and_only_on_p3_p4():
    fpn = _fpn()
    images, ids, mask = _inputs()
    with torch.no_grad():
        ref = fpn.eval()(images, ids, mask)[0]
        assert all(torch.equal(ref[k], v) for k, v in fpn(images, ids, mask)[0].items())
        torch.manual_seed(0)
        train = fpn.train()(images, ids, mask)[0]
    for k in ("p5", "p6", "p7"):  # eval mode's fused window attention: ~1e-6 from training mode's
        torch.testing.assert_close(train[k], ref[k], atol=1e-5, rtol=0)
    for k in ("p3", "p4"):
        assert (train[k] - ref[k]).abs().max() > 1e-3
    no_drop = _fpn(drop_block=False)
    with torch.no_grad():
        a = no_drop.train()(images, ids, mask)[0]
        b = no_drop.eval()(images, ids, mask)[0]
    for k in a:  # up to eval mode's fused window attention (~1e-6)
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_drop_block_feeds_the_output_conv_only_not_the_top_down_path():
    """As the original's FPN: the merged map of a level is dropped on its way into that level's
    3 x 3 output conv, while the map passed down to the next finer level stays whole. A stand-in
    that doubles its input and records it: P3's merged map is lateral(res3) + up(P4's merged map),
    not up(twice that)."""

    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x)
            return 2 * x

    fpn = _fpn().eval()
    fpn.drop_block = Record()
    images, ids, mask = _inputs()
    with torch.no_grad():
        feats, _ = fpn(images, ids, mask)
        bottom_up, _ = fpn.bottom_up(images, ids, mask)
        merged4, merged3 = fpn.drop_block.seen
        lateral3 = fpn.lateral_convs[2](bottom_up[fpn.in_features[0]])
        up = F.interpolate(merged4, size=lateral3.shape[-2:], mode="nearest")
        torch.testing.assert_close(merged3, lateral3 + up)
        torch.testing.assert_close(feats["p3"], fpn.output_convs[2](2 * merged3))


def test_drop_block_counts_in_float32_under_half_precision():
    """90,000 positions of one fp16 map: the kept count passes fp16's 65,504, where an fp16 count
    turned the rescale into 0 and the whole map into zeros. The same draws on fp32 input give the
    same output."""
    drop = DropBlock2d(0.3, 3).train()
    x = torch.rand(1, 2, 300, 300, generator=torch.Generator().manual_seed(0)) + 0.5
    torch.manual_seed(1)
    half = drop(x.half())
    torch.manual_seed(1)
    full = drop(x)
    assert half.dtype == torch.float32  # the float32 mask promotes it, as the original's does
    assert torch.isfinite(half).all() and (half != 0).float().mean() > 0.5
    torch.testing.assert_close(half, full, rtol=1e-3, atol=1e-3)


def test_drop_block_keep_rate_shared_mask_and_rescale():
    p, block = 0.3, 3
    gamma = p / block**2
    height = width = 48
    # expected keep rate: a position survives if no seed falls in its (clipped) 3x3 neighbourhood
    counts = torch.zeros(height, width)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ys = torch.arange(height) + dy
            xs = torch.arange(width) + dx
            inside = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]
            counts += inside.float()
    expected = ((1 - gamma) ** counts).mean().item()

    torch.manual_seed(0)
    drop = DropBlock2d(p, block).train()
    out = drop(torch.ones(8, 3, height, width))
    kept = out[:, 0] != 0
    assert abs(kept.float().mean().item() - expected) < 0.03
    assert torch.equal(out[:, 0] != 0, out[:, 2] != 0)  # one mask per image, all channels
    scale = out[out != 0].unique()
    assert scale.numel() == 1
    torch.testing.assert_close(scale[0], torch.tensor(1.0 / kept.float().mean().item()))
    drop.eval()
    x = torch.randn(2, 3, 5, 5)
    assert drop(x) is x
    with pytest.raises(ValueError):
        DropBlock2d(1.5, 3)


def test_registered_builder_from_config():
    assert fiber_d2  # importing the package registers the backbone
    cfg = get_cfg()
    fiber_d2.add_fiber_config(cfg)
    cfg.merge_from_list(
        [
            "MODEL.SWIN.EMBED_DIM",
            16,
            "MODEL.SWIN.DEPTHS",
            [2, 2, 2, 2],
            "MODEL.SWIN.NUM_HEADS",
            [1, 2, 2, 4],
            "MODEL.SWIN.WINDOW_SIZE",
            4,
            "MODEL.LANGUAGE_BACKBONE.HIDDEN_SIZE",
            32,
            "MODEL.LANGUAGE_BACKBONE.NUM_LAYERS",
            2,
            "MODEL.LANGUAGE_BACKBONE.NUM_HEADS",
            2,
            "MODEL.LANGUAGE_BACKBONE.INTERMEDIATE_SIZE",
            64,
            "MODEL.LANGUAGE_BACKBONE.VOCAB_SIZE",
            100,
            "MODEL.LANGUAGE_BACKBONE.MAX_POSITION_EMBEDDINGS",
            40,
            "MODEL.FIBER.NUM_FUSION_LAYERS",
            2,
            "MODEL.FPN.OUT_CHANNELS",
            16,
        ]
    )
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, FIBERFPN)
    assert backbone.drop_block is not None and backbone.drop_block.p == 0.3
    assert backbone.top_block.in_feature == "p5"
    assert backbone.bottom_up.image_tower.fused_block_ids == [6, 7]
    assert backbone.bottom_up.text_tower.fused_layer_ids == [0, 1]
    names = {n.split(".")[0] for n, _ in backbone.named_parameters()}
    assert {"fpn_lateral3", "fpn_lateral5", "fpn_output4", "top_block", "bottom_up"} <= names
