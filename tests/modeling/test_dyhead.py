"""DyHead tower: deformable-conv buffer reads, block math against a slow reference, shapes."""

import math

import pytest
import torch

from fiber_d2.modeling.head.dyhead import DyConv, DyHead, modulated_deform_conv3x3


def _bilinear(img, y, x):
    """Zero-padded bilinear sample of img (C, H, W) at real (y, x), DCN boundary rule."""
    _, height, width = img.shape
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return torch.zeros(img.shape[0], dtype=torch.float64)
    y0, x0 = math.floor(y), math.floor(x)
    out = torch.zeros(img.shape[0], dtype=torch.float64)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * img[:, yy, xx].double()
    return out


def _slow_deform(x, offset, mask, weight, bias, stride):
    """Explicit modulated deformable 3x3 conv reading each sample's buffers as flat memory."""
    batch, _, height, width = x.shape
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    n = out_h * out_w
    w = weight.double().reshape(weight.shape[0], weight.shape[1], 9)
    out = torch.zeros(batch, weight.shape[0], out_h, out_w, dtype=torch.float64)
    for b in range(batch):
        off = offset[b].reshape(-1).double().tolist()
        msk = mask[b].reshape(-1).double().tolist()
        for i in range(out_h):
            for j in range(out_w):
                p = i * out_w + j
                cols = []
                for k in range(9):
                    ky, kx = divmod(k, 3)
                    dy, dx = off[2 * k * n + p], off[(2 * k + 1) * n + p]
                    sample = _bilinear(x[b], i * stride - 1 + ky + dy, j * stride - 1 + kx + dx)
                    cols.append(msk[k * n + p] * sample)
                col = torch.stack(cols, dim=1)
                out[b, :, i, j] = torch.einsum("ock,ck->o", w, col) + bias.double()
    return out


def _upsample_align_corners(x, size):
    """Explicit bilinear resize with align_corners=True, x (B, C, h, w)."""
    _, _, h, w = x.shape
    out_h, out_w = size
    out = torch.zeros(x.shape[0], x.shape[1], out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(math.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(math.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, :, i, j] = (
                (1 - fy) * (1 - fx) * x[:, :, y0, x0]
                + (1 - fy) * fx * x[:, :, y0, x1]
                + fy * (1 - fx) * x[:, :, y1, x0]
                + fy * fx * x[:, :, y1, x1]
            )
    return out


def _group_norm(x, groups, weight, bias, eps=1e-5):
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    g = (g - mean) / torch.sqrt(var + eps)
    return (
        g.reshape(b, c, h, w) * weight.double()[None, :, None, None]
        + bias.double()[None, :, None, None]
    )


def _hsig(x):
    return torch.clamp((x + 3) / 6, 0, 1)


def _reference_unit(block, k, x, off, msk, stride, groups):
    """Deformable conv k of the block (reference) followed by GroupNorm."""
    conv = block.DyConv[k]
    y = _slow_deform(x, off, msk, conv.conv.weight.detach(), conv.conv.bias.detach(), stride)
    return _group_norm(y, groups, conv.bn.weight.detach(), conv.bn.bias.detach())


def _reference_block(block, feats, groups):
    """Independent float64 evaluation of one DyConv block."""
    outs = []
    for level, f in enumerate(feats):
        om = torch.nn.functional.conv2d(
            f.double(), block.offset.weight.double(), block.offset.bias.double(), padding=1
        )
        off, msk = om[:, :18], torch.sigmoid(om[:, 18:])
        branches = [_reference_unit(block, 1, f, off, msk, 1, groups)]
        if level > 0:
            branches.append(_reference_unit(block, 2, feats[level - 1], off, msk, 2, groups))
        if level < len(feats) - 1:
            coarser = _reference_unit(block, 0, feats[level + 1], off, msk, 1, groups)
            branches.append(_upsample_align_corners(coarser, f.shape[-2:]))
        aw = block.AttnConv[1].weight.detach().double().reshape(-1)
        ab = block.AttnConv[1].bias.detach().double()
        weighted = []
        for br in branches:
            pooled = br.mean(dim=(2, 3))
            pi = _hsig(torch.relu(pooled @ aw + ab))
            weighted.append(pi[:, None, None, None] * br)
        m = torch.stack(weighted).mean(0)
        fc0, fc2 = block.relu.fc[0], block.relu.fc[2]
        y = torch.relu(m.mean(dim=(2, 3)) @ fc0.weight.double().t() + fc0.bias.double())
        y = _hsig(y @ fc2.weight.double().t() + fc2.bias.double())
        c = m.shape[1]
        a1, b1, a2, b2 = (y[:, i * c : (i + 1) * c, None, None] for i in range(4))
        a1, a2, b1, b2 = 2 * (a1 - 0.5) + 1, 2 * (a2 - 0.5), b1 - 0.5, b2 - 0.5
        outs.append(torch.maximum(m * a1 + b1, m * a2 + b2))
    return outs


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("stride", [1, 2])
def test_deform_conv_matches_slow_reference_same_size(stride):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4)
    oh, ow = (5 - 1) // stride + 1, (4 - 1) // stride + 1
    offset = torch.randn(2, 18, oh, ow) * 1.5
    mask = torch.rand(2, 9, oh, ow)
    weight, bias = torch.randn(4, 3, 3, 3), torch.randn(4)
    got = modulated_deform_conv3x3(x, offset, mask, weight, bias, stride)
    want = _slow_deform(x, offset, mask, weight, bias, stride)
    assert got.shape == (2, 4, oh, ow)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_deform_conv_reinterprets_larger_offset_buffer():
    # Conv on a 2x3 map with offsets/mask of a 4x5 map: the kernel reads each sample's prefix.
    torch.manual_seed(1)
    x = torch.randn(2, 3, 2, 3)
    offset_mask = torch.randn(2, 27, 4, 5)
    offset = offset_mask[:, :18]  # non-contiguous slice, as in the block
    mask = offset_mask[:, 18:].sigmoid()
    weight, bias = torch.randn(4, 3, 3, 3), torch.randn(4)
    got = modulated_deform_conv3x3(x, offset, mask, weight, bias, 1)
    want = _slow_deform(x, offset, mask, weight, bias, 1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # Not the same as cropping the top-left corner of the offset maps.
    cropped = modulated_deform_conv3x3(
        x, offset[:, :, :2, :3].contiguous(), mask[:, :, :2, :3], weight, bias, 1
    )
    assert (cropped - got).abs().max() > 1e-3


def test_deform_conv_rejects_too_small_offset():
    with pytest.raises(ValueError, match="fewer positions"):
        modulated_deform_conv3x3(
            torch.zeros(1, 2, 4, 4),
            torch.zeros(1, 18, 2, 2),
            torch.zeros(1, 9, 2, 2),
            torch.zeros(2, 2, 3, 3),
            None,
        )


def test_deform_conv_runs_fp32_under_autocast():
    x = torch.randn(1, 2, 3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = modulated_deform_conv3x3(
            x, torch.zeros(1, 18, 3, 3), torch.ones(1, 9, 3, 3), torch.randn(2, 2, 3, 3), None
        )
    assert out.dtype == torch.float32


def test_dyconv_block_matches_independent_reference():
    torch.manual_seed(2)
    block = DyConv(channels=4, num_groups=2, use_dyrelu=True, use_dfconv=True)
    _randomise(block, 3)
    feats = [torch.randn(2, 4, 5, 4), torch.randn(2, 4, 3, 2), torch.randn(2, 4, 2, 1)]
    with torch.no_grad():
        got = block(feats)
    want = _reference_block(block, feats, groups=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_dyhead_shapes_five_odd_levels_and_names():
    torch.manual_seed(4)
    head = DyHead(channels=16, num_convs=2, num_groups=16)
    sizes = [(13, 11), (7, 6), (4, 3), (2, 2), (1, 1)]
    feats = [torch.randn(2, 16, h, w) for h, w in sizes]
    out = head(feats)
    assert [tuple(o.shape) for o in out] == [(2, 16, h, w) for h, w in sizes]
    assert all(torch.isfinite(o).all() for o in out)
    keys = set(head.state_dict())
    for k in ("1.DyConv.0.conv.weight", "1.DyConv.2.bn.bias", "0.AttnConv.1.weight"):
        assert k in keys
    assert {"0.relu.fc.0.weight", "0.relu.fc.2.bias", "0.offset.weight"} <= keys


def test_dyhead_plain_conv_variant_shapes():
    head = DyHead(channels=8, num_convs=1, num_groups=4, use_dyrelu=False, use_dfconv=False)
    assert head[0].offset is None
    out = head([torch.randn(1, 8, 5, 5), torch.randn(1, 8, 3, 3)])
    assert [tuple(o.shape) for o in out] == [(1, 8, 5, 5), (1, 8, 3, 3)]
    assert all((o >= 0).all() for o in out)  # plain ReLU


def test_dyhead_rejects_inconsistent_level_sizes():
    head = DyHead(channels=8, num_convs=1, num_groups=4)
    with pytest.raises(ValueError, match="stride-2"):
        head([torch.randn(1, 8, 6, 6), torch.randn(1, 8, 4, 3)])
    with pytest.raises(ValueError, match="expected"):
        head([torch.randn(1, 4, 6, 6)])


def test_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(5)
    plain = DyHead(channels=8, num_convs=2, num_groups=4)
    ckpt = DyHead(channels=8, num_convs=2, num_groups=4, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    sizes = [(6, 5), (3, 3), (2, 2)]
    base = [torch.randn(1, 8, h, w) for h, w in sizes]
    results = []
    for model in (plain, ckpt):
        feats = [b.clone().requires_grad_(True) for b in base]
        out = model(feats)
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(out))
        loss.backward()
        results.append((out, [f.grad for f in feats], [p.grad.clone() for p in model.parameters()]))
    (o1, g1, p1), (o2, g2, p2) = results
    for a, b in zip(o1 + g1 + p1, o2 + g2 + p2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scale_attention_lies_in_half_to_one():
    block = DyConv(channels=8, num_groups=4)
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        block.AttnConv[1].bias.fill_(-100.0)
        assert torch.allclose(block.scale_attention(x), torch.full((3, 1, 1, 1), 0.5))
        block.AttnConv[1].bias.fill_(100.0)
        assert torch.allclose(block.scale_attention(x), torch.ones(3, 1, 1, 1))
        block.AttnConv[1].bias.zero_()
        block.AttnConv[1].weight.normal_(std=5.0)
        w = block.scale_attention(torch.randn(64, 8, 4, 4))
    assert (w >= 0.5).all() and (w <= 1.0).all()


def test_initialisation():
    block = DyConv(channels=256, num_groups=16)
    bound = 1.0 / math.sqrt(9 * 256)
    for unit in block.DyConv:
        assert unit.conv.weight.abs().max() <= bound
        assert unit.conv.weight.std() > 0.5 * bound  # uniform, not N(0, 0.01)
        assert (unit.conv.bias == 0).all()
        assert unit.bn.num_groups == 16
    assert (block.AttnConv[1].bias == 0).all()
    assert abs(block.AttnConv[1].weight.std().item() - 0.01) < 0.003
    assert block.offset.weight.abs().max() > 0  # default init, not zero


def test_parameter_count_fiber_b():
    head = DyHead(channels=256, num_convs=6, num_groups=16)
    n = sum(p.numel() for p in head.parameters())
    assert abs(n - 11.50e6) / 11.50e6 < 0.005


@pytest.mark.parametrize("stride,size", [(1, (7, 9)), (2, (8, 11)), (2, (9, 9)), (1, (1, 3))])
def test_sampling_deform_conv_equals_torchvision(stride, size):
    """The CPU sampling path gives torchvision's deform_conv2d outputs and gradients."""
    from torchvision.ops import deform_conv2d

    from fiber_d2.modeling.head.dyhead import deform_conv3x3_by_sampling

    g = torch.Generator().manual_seed(stride * 10 + size[0])
    h_in, w_in = size
    h, w = (h_in - 1) // stride + 1, (w_in - 1) // stride + 1
    dt = torch.float64
    x = torch.randn(2, 5, h_in, w_in, generator=g, dtype=dt, requires_grad=True)
    off = (2 * torch.randn(2, 18, h, w, generator=g, dtype=dt)).requires_grad_()
    m = torch.rand(2, 9, h, w, generator=g, dtype=dt).requires_grad_()
    wt = torch.randn(4, 5, 3, 3, generator=g, dtype=dt, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=dt, requires_grad=True)
    ref = deform_conv2d(x, off, wt, b, stride=stride, padding=1, mask=m)
    got = deform_conv3x3_by_sampling(x, off, m, wt, b, stride)
    torch.testing.assert_close(got, ref)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, off, m, wt, b])
    g_got = torch.autograd.grad(got.square().sum(), [x, off, m, wt, b])
    for a, c in zip(g_got, g_ref):
        torch.testing.assert_close(a, c)


def _deform_inputs(seed: int, stride: int, offset_size=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 9, 8, generator=g)
    out_hw = offset_size or ((9 - 1) // stride + 1, (8 - 1) // stride + 1)
    offset = 1.5 * torch.randn(2, 18, *out_hw, generator=g)
    mask = torch.rand(2, 9, *out_hw, generator=g)
    weight = torch.randn(5, 6, 3, 3, generator=g)
    bias = torch.randn(5, generator=g)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("stride,offset_size", [(1, None), (2, None), (1, (6, 7))])
def test_recomputed_deform_conv_matches_the_sampling_path_and_its_gradients(stride, offset_size):
    """The memory-saving Function gives the sampling path's outputs and gradients (1e-6)."""
    base = _deform_inputs(3, stride, offset_size if stride == 1 else None)
    if offset_size is not None:  # larger offset map than the output: the buffer-prefix read
        x, offset, mask, weight, bias = base
        base = (x[:, :, :5, :6], offset, mask, weight, bias)  # output (5, 6) < offset (6, 7)
    results = []
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in base]
        out = modulated_deform_conv3x3(*leaves, stride=stride, recompute=recompute)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    names = ["out", "x", "offset", "mask", "weight", "bias"]
    for name, a, b in zip(names, *results):
        assert b is not None, name
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=name)
    assert results[1][2].abs().sum() > 0  # the offsets do receive gradient


@pytest.mark.parametrize("batch,stride,with_bias", [(1, 1, True), (3, 1, True), (3, 2, False)])
def test_sampling_deform_conv_inference_path_equals_the_training_path(batch, stride, with_bias):
    """Without autograd (channels-last sampling, in-place mask and bias, one GEMM per sample) the
    sampling path gives what it gives with autograd, sample by sample (1e-6; bit for bit where
    measured)."""
    from fiber_d2.modeling.head.dyhead import deform_conv3x3_by_sampling

    g = torch.Generator().manual_seed(batch * 10 + stride)
    x = torch.randn(batch, 32, 11, 13, generator=g)
    h, w = (11 - 1) // stride + 1, (13 - 1) // stride + 1
    offset = 1.5 * torch.randn(batch, 18, h, w, generator=g)
    mask = torch.rand(batch, 9, h, w, generator=g)
    weight = torch.randn(24, 32, 3, 3, generator=g) * 0.1
    bias = torch.randn(24, generator=g) if with_bias else None
    with torch.enable_grad():
        want = deform_conv3x3_by_sampling(x.requires_grad_(), offset, mask, weight, bias, stride)
    x = x.detach()
    with torch.no_grad():
        got = deform_conv3x3_by_sampling(x, offset, mask, weight, bias, stride)
        one = [
            deform_conv3x3_by_sampling(
                x[i : i + 1], offset[i : i + 1], mask[i : i + 1], weight, bias, stride
            )
            for i in range(batch)
        ]
    assert got.shape == (batch, 24, h, w) and got.is_contiguous()
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(one), got, atol=1e-6, rtol=1e-6)
    assert x.is_contiguous()  # the caller's input is left as it was


def test_recomputed_deform_conv_saves_only_its_inputs():
    """The graph keeps the 4 inputs, not the (B, C, 9, h, w) samples."""
    x, offset, mask, weight, bias = [t.requires_grad_(True) for t in _deform_inputs(4, 1)]
    sample_numel = x.shape[0] * x.shape[1] * 9 * x.shape[2] * x.shape[3]
    for recompute, keeps_samples in ((False, True), (True, False)):
        saved: list[torch.Tensor] = []

        def pack(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            modulated_deform_conv3x3(x, offset, mask, weight, bias, recompute=recompute)
        largest = max(t.numel() for t in saved)
        assert (largest >= sample_numel) == keeps_samples


def test_dyhead_recompute_switch_keeps_outputs_and_grads():
    torch.manual_seed(6)
    heads = [DyHead(channels=8, num_convs=2, num_groups=4, recompute_dfconv=r) for r in (0, 1)]
    heads[1].load_state_dict(heads[0].state_dict())
    assert not heads[0][0].DyConv[1].conv.recompute and heads[1][0].DyConv[1].conv.recompute
    base = [torch.randn(1, 8, h, w) for h, w in [(6, 5), (3, 3), (2, 2)]]
    results = []
    for model in heads:
        feats = [b.clone().requires_grad_(True) for b in base]
        out = model(feats)
        sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
        results.append(out + [f.grad for f in feats] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_from_config_reads_every_dyhead_key():
    from detectron2.config import get_cfg

    from fiber_d2 import add_fiber_config

    cfg = get_cfg()
    add_fiber_config(cfg)
    cfg.merge_from_list(
        ["MODEL.DYHEAD.CHANNELS", 32, "MODEL.DYHEAD.NUM_CONVS", 2, "MODEL.DYHEAD.NUM_GROUPS", 8]
        + ["MODEL.DYHEAD.USE_DYRELU", False, "MODEL.DYHEAD.USE_DFCONV", False]
        + ["MODEL.DYHEAD.USE_CHECKPOINT", True]
    )
    head = DyHead(cfg)
    assert len(head) == 2 and head.channels == 32 and head.use_checkpoint
    block = head[0]
    assert block.offset is None and isinstance(block.relu, torch.nn.ReLU)
    assert all(isinstance(c.conv, torch.nn.Conv2d) for c in block.DyConv)
    assert {c.bn.num_groups for c in block.DyConv} == {8}
    cfg.merge_from_list(["MODEL.DYHEAD.USE_DFCONV", True, "MODEL.DYHEAD.DFCONV_RECOMPUTE", False])
    cfg.merge_from_list(["MODEL.DYHEAD.USE_DYRELU", True])
    head = DyHead(cfg)
    assert head[0].offset is not None and not isinstance(head[0].relu, torch.nn.ReLU)
    assert not any(c.conv.recompute for c in head[0].DyConv)
