"""GroundingHead: token-logit formula, output branches, frozen classifier, sizes."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from fiber_d2.config import add_fiber_config
from fiber_d2.modeling.head.dyhead import DyHead
from fiber_d2.modeling.head.grounding_head import GroundingHead


class _PassThrough(nn.Module):
    def forward(self, features):
        return list(features)


def _head(clamp=50000.0, channels=4, text_dim=6, levels=2, num_classes=5):
    torch.manual_seed(0)
    head = GroundingHead(
        dyhead_tower=_PassThrough(),
        in_channels=channels,
        num_levels=levels,
        num_classes=num_classes,
        text_dim=text_dim,
        clamp_dot_product=clamp,
    )
    with torch.no_grad():
        head.bias_lang.normal_()
        head.bias0.fill_(-1.3)
        head.log_scale.fill_(0.7)
    return head


def _reference_logits(head, feats, text):
    """Per-element loops: S[b, a, t] over levels P3->P7, anchors (y, x) row-major."""
    w = head.dot_product_projection_text.weight.detach().double()
    pb = head.dot_product_projection_text.bias.detach().double()
    bl = head.bias_lang.detach().double()
    b0 = head.bias0.item()
    temp = math.exp(head.log_scale.item())
    batch, num_tokens, _ = text.shape
    rows = []
    for b in range(batch):
        per_image = []
        for f in feats:
            _, _, h, wd = f.shape
            for y in range(h):
                for x in range(wd):
                    q = f[b, :, y, x].double()
                    row = []
                    for t in range(num_tokens):
                        e = text[b, t].double()
                        norm = e.norm().item()
                        e = e / norm if norm > 0 else e
                        proj = w @ (e / 2) + pb
                        row.append((q @ proj).item() / temp + (e @ bl).item() + b0)
                    per_image.append(row)
        rows.append(per_image)
    return torch.tensor(rows, dtype=torch.float64)


def test_token_logits_match_hand_computation_with_padding_rows():
    head = _head()
    feats = [torch.randn(2, 4, 3, 2), torch.randn(2, 4, 2, 1)]
    text = torch.randn(2, 5, 6)
    text[0, 3:] = 0  # padding rows are zeroed by the text tower
    out = head(feats, text)
    got = torch.cat(out["token_logits"], dim=1)
    assert [tuple(t.shape) for t in out["token_logits"]] == [(2, 6, 5), (2, 2, 5)]
    want = _reference_logits(head, feats, text)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # A padding token: (F . projection bias) / exp(log_scale) + bias0, no bias_lang term.
    pb = head.dot_product_projection_text.bias.detach()
    q = feats[0][0, :, 1, 0]
    expected_pad = (q @ pb).item() / math.exp(0.7) - 1.3
    assert abs(got[0, 2, 4].item() - expected_pad) < 1e-5


def test_token_logits_are_clamped():
    head = _head(clamp=3.0)
    feats = [torch.randn(1, 4, 3, 3) * 100, torch.randn(1, 4, 2, 2) * 100]
    text = torch.randn(1, 4, 6)
    got = torch.cat(head(feats, text)["token_logits"], dim=1)
    want = _reference_logits(head, feats, text).clamp(-3.0, 3.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got.max().item() == 3.0 and got.min().item() == -3.0


def test_box_centerness_and_cls_branches():
    head = _head()
    feats = [torch.randn(2, 4, 3, 2), torch.randn(2, 4, 2, 1)]
    with torch.no_grad():
        head.scales[1].scale.fill_(2.5)
    out = head(feats, torch.randn(2, 3, 6))
    for level, f in enumerate(feats):
        plain = nn.functional.conv2d(f, head.bbox_pred.weight, head.bbox_pred.bias)
        factor = 2.5 if level == 1 else 1.0
        torch.testing.assert_close(out["box_regression"][level], plain * factor)
        assert out["centerness"][level].shape == (2, 1) + f.shape[-2:]
        assert out["cls_logits"][level].shape == (2, 4) + f.shape[-2:]


def test_initial_values_and_frozen_classifier():
    head = _head()
    fresh = GroundingHead(dyhead_tower=_PassThrough(), in_channels=4, num_classes=5, text_dim=6)
    assert not any(p.requires_grad for p in fresh.cls_logits.parameters())
    torch.testing.assert_close(fresh.cls_logits.bias, torch.full((4,), -math.log(99.0)))
    assert abs(fresh.bias0.item() - math.log(0.01 / 0.99)) < 1e-6
    assert fresh.log_scale.item() == 0.0 and (fresh.bias_lang == 0).all()
    assert fresh.bias_lang.shape == (6,)
    assert [s.scale.item() for s in fresh.scales] == [1.0] * 5
    assert (fresh.bbox_pred.bias == 0).all() and (fresh.centerness.bias == 0).all()
    # Gradients reach the trainable parameters but never the frozen classifier.
    out = head([torch.randn(1, 4, 2, 2), torch.randn(1, 4, 1, 1)], torch.randn(1, 3, 6))
    total = sum(t.sum() for v in out.values() for t in v)
    total.backward()
    assert head.cls_logits.weight.grad is None
    assert head.bias_lang.grad is not None and head.log_scale.grad is not None


def test_rejects_wrong_inputs():
    head = _head()
    with pytest.raises(ValueError, match="feature levels"):
        head([torch.randn(1, 4, 2, 2)], torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="text_embedded"):
        head([torch.randn(1, 4, 2, 2), torch.randn(1, 4, 1, 1)], torch.randn(2, 3, 6))


def test_from_config_and_output_layer_size():
    cfg = add_fiber_config(get_cfg())
    head = GroundingHead(cfg)
    assert isinstance(head.dyhead_tower, DyHead) and len(head.dyhead_tower) == 6
    tower = sum(p.numel() for p in head.dyhead_tower.parameters())
    outputs = sum(p.numel() for p in head.parameters()) - tower
    assert abs(tower - 11.50e6) / 11.50e6 < 0.005
    assert abs(outputs - 0.22e6) / 0.22e6 < 0.005
    assert head.cls_logits.weight.shape == (80, 256, 1, 1)
    assert head.dot_product_projection_text.weight.shape == (256, 768)
    assert len(head.state_dict()) == 136
