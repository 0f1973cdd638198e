"""Anchors, legacy box coder, ATSS assignment and the grounding losses."""

import math
import statistics

import pytest
import torch

from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.head.atss import (
    ATSSLossComputation,
    LegacyBoxCoder,
    atss_assign,
    centre_distances,
    generate_anchors,
    legacy_box_iou,
)

# ---------------------------------------------------------------- independent references


def _iou1(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0) * max(ih, 0)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _ref_atss(levels, gts, topk):
    """Loop implementation of ATSS: levels = list of lists of boxes, gts = list of boxes."""
    anchors = [a for lvl in levels for a in lvl]
    ctr = lambda r: ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2)  # noqa: E731
    best = [(-1.0, -1)] * len(anchors)
    for g, gt in enumerate(gts):
        gx, gy = ctr(gt)
        cands, start = [], 0
        for lvl in levels:
            idx = sorted(
                range(len(lvl)),
                key=lambda i: math.hypot(ctr(lvl[i])[0] - gx, ctr(lvl[i])[1] - gy),
            )
            cands += [start + i for i in idx[:topk]]
            start += len(lvl)
        ious = [_iou1(anchors[c], gt) for c in cands]
        thr = statistics.mean(ious) + statistics.stdev(ious)
        for c, iou in zip(cands, ious):
            ax, ay = ctr(anchors[c])
            inside = min(ax - gt[0], ay - gt[1], gt[2] - ax, gt[3] - ay) > 0.01
            if iou >= thr and inside and iou > best[c][0]:
                best[c] = (iou, g)
    return [g for _, g in best]


def _ref_decode(d, a, weights=(10.0, 10.0, 5.0, 5.0)):
    w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    clip = math.log(1000.0 / 16)
    pcx, pcy = d[0] / weights[0] * w + cx, d[1] / weights[1] * h + cy
    pw = math.exp(min(d[2] / weights[2], clip)) * w
    ph = math.exp(min(d[3] / weights[3], clip)) * h
    return [pcx - (pw - 1) / 2, pcy - (ph - 1) / 2, pcx + (pw - 1) / 2, pcy + (ph - 1) / 2]


def _ref_giou(p, t):
    p = [p[0], p[1], max(p[0], p[2]), max(p[1], p[3])]
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    iw, ih = min(p[2], t[2]) - max(p[0], t[0]), min(p[3], t[3]) - max(p[1], t[1])
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = area(p) + area(t) - inter
    enc = (max(p[2], t[2]) - min(p[0], t[0])) * (max(p[3], t[3]) - min(p[1], t[1]))
    return inter / union - (enc - union) / enc


def _ref_ctr(gt, a):
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    lr = [cx - gt[0], gt[2] - cx]
    tb = [cy - gt[1], gt[3] - cy]
    return math.sqrt(min(lr) / max(lr) * min(tb) / max(tb))


def _ref_focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


# ---------------------------------------------------------------- anchors and coder


def test_anchor_values_stride_8_and_128():
    a8, a128 = generate_anchors([(2, 3), (1, 2)], [8, 128], [64, 1024])
    assert a8.shape == (6, 4) and a128.shape == (2, 4)
    assert a8[0].tolist() == [-28.0, -28.0, 35.0, 35.0]
    assert a8[1].tolist() == [-20.0, -28.0, 43.0, 35.0]  # x moves first (y-major order)
    assert a8[3].tolist() == [-28.0, -20.0, 35.0, 43.0]
    assert a128[0].tolist() == [-448.0, -448.0, 575.0, 575.0]
    assert a128[1].tolist() == [-320.0, -448.0, 703.0, 575.0]
    with pytest.raises(ValueError):
        generate_anchors([(2, 2)], [8, 16], [64])


def test_box_coder_hand_values_round_trip_and_clamp():
    coder = LegacyBoxCoder((10, 10, 5, 5))
    anchor = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # w = h = 10, centre 4.5
    gt = torch.tensor([[5.0, 0.0, 14.0, 19.0]])  # w 10, h 20, centre (9.5, 9.5)
    d = coder.encode(gt, anchor)
    torch.testing.assert_close(d, torch.tensor([[5.0, 5.0, 0.0, 5 * math.log(2.0)]]))
    torch.testing.assert_close(coder.decode(d, anchor), gt)
    torch.manual_seed(0)
    anchors = torch.rand(20, 2) * 50
    anchors = torch.cat([anchors, anchors + torch.rand(20, 2) * 30 + 2], dim=1)
    boxes = torch.rand(20, 2) * 50
    boxes = torch.cat([boxes, boxes + torch.rand(20, 2) * 40 + 1], dim=1)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes)
    # dw = 50 / 5 = 10 is clamped to log(62.5): width 625, box = 4.5 +- 312.
    big = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 0.0]]), anchor)
    torch.testing.assert_close(big, torch.tensor([[4.5 - 312.0, 0.0, 4.5 + 312.0, 9.0]]))


def test_legacy_iou_uses_plus_one_areas():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0]])
    assert abs(legacy_box_iou(a, b).item() - 50 / 150) < 1e-6  # plain IoU would be 36/126


# ---------------------------------------------------------------- ATSS


def test_atss_threshold_hand_case():
    anchors = torch.tensor(
        [[0, 0, 9, 9], [10, 0, 19, 9], [20, 0, 29, 9], [0, 10, 9, 19], [100, 100, 109, 109.0]]
    )
    gt = torch.tensor([[0.0, 0.0, 14.0, 9.0]])
    # Candidates (3 closest centres): anchors 0, 1, 3 with IoUs 2/3, 1/4, 0.
    thr = statistics.mean([2 / 3, 1 / 4, 0]) + statistics.stdev([2 / 3, 1 / 4, 0])
    assert 1 / 4 < thr < 2 / 3
    assert atss_assign([anchors], gt, topk=3).tolist() == [0, -1, -1, -1, -1]


def test_atss_threshold_uses_unbiased_std():
    gt = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    anchors = torch.tensor([[0, 0, 9, 1], [0, 0, 9, 4], [0, 0, 9, 6.0]])  # IoUs 0.2, 0.5, 0.7
    ious = [0.2, 0.5, 0.7]
    # 0.7 clears mean + population std but not mean + sample std.
    assert statistics.mean(ious) + statistics.pstdev(ious) < 0.7
    assert 0.7 < statistics.mean(ious) + statistics.stdev(ious)
    assert atss_assign([anchors], gt, topk=9).tolist() == [-1, -1, -1]


def test_atss_centre_inside_rule_rejects_high_iou_anchor():
    anchors = torch.tensor(
        [[0, 0, 99, 99], [0, 0, 19, 19], [0, 40, 19, 59], [200, 200, 209, 209.0]]
    )
    gt = torch.tensor([[0.0, 0.0, 39.0, 99.0]])
    # Candidates 2, 0, 1 with IoUs 0.1, 0.4, 0.1: anchor 0 clears the threshold but its centre
    # x = 49.5 lies right of the GT.
    ious = [0.1, 0.4, 0.1]
    assert 0.4 >= statistics.mean(ious) + statistics.stdev(ious)
    assert atss_assign([anchors], gt, topk=3).tolist() == [-1, -1, -1, -1]


def test_atss_margin_of_centre_inside_test():
    anchors = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]])  # centre x 4.5
    close = torch.tensor([[4.495, 0.0, 20.0, 9.0]])  # l = 0.005 <= 0.01
    inside = torch.tensor([[4.48, 0.0, 20.0, 9.0]])  # l = 0.02 > 0.01
    assert atss_assign([anchors], close, topk=2).tolist() == [-1, -1]
    assert atss_assign([anchors], inside, topk=2).tolist() == [0, 0]


def test_atss_anchor_takes_gt_with_largest_iou():
    anchors = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]])
    exact = [0.0, 0.0, 9.0, 9.0]  # IoU 1
    larger = [0.0, 0.0, 11.0, 11.0]  # IoU 100/144, also positive
    assert atss_assign([anchors], torch.tensor([exact, larger]), 2).tolist() == [0, 0]
    assert atss_assign([anchors], torch.tensor([larger, exact]), 2).tolist() == [1, 1]


def test_atss_empty_gt():
    anchors = generate_anchors([(2, 2)], [8], [16])
    assert atss_assign(anchors, torch.zeros(0, 4)).tolist() == [-1] * 4


def test_atss_matches_loop_reference_on_pyramid():
    torch.manual_seed(3)
    anchors = generate_anchors([(8, 7), (4, 4), (2, 2)], [8, 16, 32], [32, 64, 128])
    xy = torch.rand(6, 2) * 40
    gts = torch.cat([xy, xy + torch.rand(6, 2) * 30 + 4], dim=1)
    got = atss_assign(anchors, gts, topk=4)
    want = _ref_atss([a.tolist() for a in anchors], gts.tolist(), 4)
    assert got.tolist() == want
    assert (got >= 0).sum() >= 6


def test_centre_distances_are_exact_at_image_coordinates():
    """2,000 anchor centres and 30 GT centres over 1,300 px: within 1e-3 px of the float64
    distances everywhere (the original's explicit formula; ``torch.cdist``'s matrix-product path
    for more than 25 points is about 0.01 px off here, enough to reorder a near-tie)."""
    g = torch.Generator().manual_seed(0)
    points, centres = torch.rand(2000, 2, generator=g) * 1300, torch.rand(30, 2, generator=g) * 1300
    exact = (points.double()[:, None] - centres.double()[None]).pow(2).sum(-1).sqrt()
    got = centre_distances(points, centres)
    assert got.dtype == torch.float32 and got.shape == (2000, 30)
    assert (got.double() - exact).abs().max().item() < 1e-3


# ---------------------------------------------------------------- losses


def _setup(seed, gts_per_image, text_mask):
    torch.manual_seed(seed)
    shapes, batch, num_tokens = [(4, 4), (2, 2)], len(gts_per_image), text_mask.shape[1]
    anchors = generate_anchors(shapes, [8, 16], [16, 32])
    outputs = {
        "box_regression": [torch.randn(batch, 4, h, w) * 0.5 for h, w in shapes],
        "centerness": [torch.randn(batch, 1, h, w) for h, w in shapes],
        "token_logits": [torch.randn(batch, h * w, num_tokens) * 2 for h, w in shapes],
        "cls_logits": [torch.randn(batch, 3, h, w) for h, w in shapes],
    }
    for v in outputs.values():
        for t in v:
            t.requires_grad_(True)
    targets = []
    for boxes in gts_per_image:
        g = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        pm = torch.zeros(len(g), num_tokens, dtype=torch.bool)
        for i in range(len(g)):
            pm[i, i % (num_tokens - 1)] = True
            pm[i, (i + 1) % (num_tokens - 1)] = True
        targets.append({"gt_boxes": g, "positive_map": pm})
    return anchors, outputs, targets


def _ref_losses(anchors, outputs, targets, text_mask, topk, alpha=0.25, gamma=2.0):
    flat_anchors = [a for lvl in anchors for a in lvl.tolist()]
    batch = len(targets)
    tok = [torch.cat([t[b] for t in outputs["token_logits"]]).tolist() for b in range(batch)]
    reg = [
        torch.cat(
            [r[b].permute(1, 2, 0).reshape(-1, 4) for r in outputs["box_regression"]]
        ).tolist()
        for b in range(batch)
    ]
    ctr = [
        torch.cat([c[b].reshape(-1) for c in outputs["centerness"]]).tolist() for b in range(batch)
    ]
    focal, giou_sum, w_sum, bce, npos = 0.0, 0.0, 0.0, 0.0, 0
    for b, tgt in enumerate(targets):
        gts = tgt["gt_boxes"].tolist()
        pm = tgt["positive_map"].tolist()
        matched = _ref_atss([a.tolist() for a in anchors], gts, topk) if gts else []
        matched = matched or [-1] * len(flat_anchors)
        for a, m in enumerate(matched):
            row = [float(v) for v in pm[m]] if m >= 0 else [0.0] * (len(text_mask[b]) - 1) + [1.0]
            for t, real in enumerate(text_mask[b].tolist()):
                if real:
                    focal += _ref_focal(tok[b][a][t], row[t], alpha, gamma)
            if m >= 0:
                npos += 1
                w = _ref_ctr(gts[m], flat_anchors[a])
                pred = _ref_decode(reg[b][a], flat_anchors[a])
                giou_sum += (1 - _ref_giou(pred, gts[m])) * w
                w_sum += w
                s = 1 / (1 + math.exp(-ctr[b][a]))
                bce += -(w * math.log(s) + (1 - w) * math.log(1 - s))
    n = max(npos, 1)
    return {
        "loss_dot_product_token": focal / n,
        "loss_reg": 2.0 * giou_sum / w_sum if npos else 0.0,
        "loss_centerness": bce / n,
        "npos": npos,
    }


def test_losses_match_loop_reference_and_ignore_pad_tokens():
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    gts = [[[3.2, 5.1, 20.7, 17.9], [14.3, 12.2, 30.1, 29.6]], []]  # image 1 has no box
    anchors, outputs, targets = _setup(0, gts, text_mask)
    loss_fn = ATSSLossComputation(box_coder=LegacyBoxCoder(), topk=3)
    losses = loss_fn(anchors, outputs, targets, text_mask)
    ref = _ref_losses(anchors, outputs, targets, text_mask, topk=3)
    assert ref["npos"] >= 2
    for k in ("loss_dot_product_token", "loss_reg", "loss_centerness"):
        assert abs(losses[k].item() - ref[k]) < 1e-4 * max(1.0, abs(ref[k])), k
    assert losses["loss_cls"].item() == 0.0
    sum(losses.values()).backward()
    assert outputs["cls_logits"][0].grad is not None
    # Logits at padding tokens do not change anything.
    with torch.no_grad():
        for t in outputs["token_logits"]:
            t[:, :, 4:] += 100.0
    again = loss_fn(anchors, outputs, targets, text_mask)
    assert abs(again["loss_dot_product_token"].item() - ref["loss_dot_product_token"]) < 1e-4


def test_box_loss_clamps_inverted_predicted_boxes():
    """Predicted widths / heights below the +1 convention's pixel give x2 < x1 (y2 < y1); the box
    loss clamps x2 / y2 to at least x1 / y1 before the GIoU (spec 3.5), as the reference does."""
    text_mask = torch.ones(1, 4, dtype=torch.long)
    anchors, outputs, targets = _setup(3, [[[3.2, 5.1, 20.7, 17.9]]], text_mask)
    with torch.no_grad():
        for r in outputs["box_regression"]:
            r[:, 2:] = -40.0  # exp(-40 / 5) * 16 px: far below one pixel wide and high
    losses = ATSSLossComputation(box_coder=LegacyBoxCoder(), topk=3)(
        anchors, outputs, targets, text_mask
    )
    ref = _ref_losses(anchors, outputs, targets, text_mask, topk=3)
    assert ref["npos"] >= 1
    assert abs(losses["loss_reg"].item() - ref["loss_reg"]) < 1e-4 * max(1.0, ref["loss_reg"])


def test_unmatched_anchor_targets_use_last_token_when_it_is_real():
    text_mask = torch.ones(1, 4, dtype=torch.long)
    anchors, outputs, targets = _setup(1, [[[3.2, 5.1, 20.7, 17.9]]], text_mask)
    loss_fn = ATSSLossComputation(box_coder=LegacyBoxCoder(), topk=3)
    matched, token_targets, _ = loss_fn.prepare_targets(anchors, targets, 4)
    unmatched = matched[0] < 0
    assert unmatched.any() and (~unmatched).any()
    assert (token_targets[0, unmatched] == torch.tensor([0.0, 0.0, 0.0, 1.0])).all()
    assert (token_targets[0, ~unmatched] == torch.tensor([1.0, 1.0, 0.0, 0.0])).all()
    losses = loss_fn(anchors, outputs, targets, text_mask)
    ref = _ref_losses(anchors, outputs, targets, text_mask, topk=3)
    assert abs(losses["loss_dot_product_token"].item() - ref["loss_dot_product_token"]) < 1e-4


def test_unmatched_anchors_are_marked_only_in_token_column_t_minus_1_of_the_full_length():
    """The original marks "no object" in column MAX_QUERY_LEN - 1; a batch cut to fewer tokens has
    no such column (there it would be padding, masked in the loss), so nothing is marked."""
    text_mask = torch.ones(1, 4, dtype=torch.long)
    anchors, _, targets = _setup(1, [[[3.2, 5.1, 20.7, 17.9]]], text_mask)
    for max_query_len, last in ((4, 1.0), (8, 0.0)):
        loss_fn = ATSSLossComputation(
            box_coder=LegacyBoxCoder(), topk=3, max_query_len=max_query_len
        )
        matched, token_targets, _ = loss_fn.prepare_targets(anchors, targets, 4)
        unmatched = matched[0] < 0
        assert unmatched.any()
        assert (token_targets[0, unmatched] == torch.tensor([0.0, 0.0, 0.0, last])).all()


def test_no_positive_batch_gives_zero_losses_with_gradients():
    text_mask = torch.tensor([[1, 1, 0, 0]])
    anchors, outputs, targets = _setup(2, [[]], text_mask)
    losses = ATSSLossComputation(box_coder=LegacyBoxCoder(), topk=3)(
        anchors, outputs, targets, text_mask
    )
    assert losses["loss_reg"].item() == 0.0 and losses["loss_centerness"].item() == 0.0
    # Token loss still counts every anchor against all-zero targets, divided by N_pos floored at 1.
    logits = torch.cat(outputs["token_logits"], dim=1)[0, :, :2].flatten().tolist()
    expected = sum(_ref_focal(x, 0.0) for x in logits)
    assert abs(losses["loss_dot_product_token"].item() - expected) < 1e-4
    sum(losses.values()).backward()
    for r in outputs["box_regression"] + outputs["centerness"]:
        assert r.grad is not None and (r.grad == 0).all()


def test_loss_rejects_bad_targets():
    text_mask = torch.ones(1, 4)
    anchors, outputs, targets = _setup(3, [[[3.0, 5.0, 20.0, 17.0]]], text_mask)
    loss_fn = ATSSLossComputation(box_coder=LegacyBoxCoder())
    bad = [{"gt_boxes": targets[0]["gt_boxes"], "positive_map": torch.zeros(1, 3, dtype=bool)}]
    with pytest.raises(ValueError, match="positive_map"):
        loss_fn(anchors, outputs, bad, text_mask)
    with pytest.raises(KeyError, match="positive_map"):
        loss_fn(anchors, outputs, [{"gt_boxes": targets[0]["gt_boxes"]}], text_mask)


def test_loss_constants_come_from_the_config():
    """TOKEN_ALPHA / TOKEN_GAMMA (focal loss), the three loss weights and ATSS.TOPK of the config
    are the ones the losses use (checked against the loop reference at non-default values)."""
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    gts = [[[3.2, 5.1, 20.7, 17.9], [14.3, 12.2, 30.1, 29.6]], [[2.0, 3.0, 40.0, 25.0]]]
    anchors, outputs, targets = _setup(4, gts, text_mask)
    opts = {
        "MODEL.DYHEAD.TOKEN_ALPHA": 0.4,
        "MODEL.DYHEAD.TOKEN_GAMMA": 1.5,
        "MODEL.DYHEAD.TOKEN_LOSS_WEIGHT": 3.0,
        "MODEL.ATSS.REG_LOSS_WEIGHT": 0.5,
        "MODEL.ATSS.CENTERNESS_LOSS_WEIGHT": 4.0,
        "MODEL.ATSS.TOPK": 3,
        "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": text_mask.shape[1],
    }
    cfg = load_config("configs/Demo/fine_tiny.yaml", [str(x) for kv in opts.items() for x in kv])
    losses = ATSSLossComputation(cfg)(anchors, outputs, targets, text_mask)
    ref = _ref_losses(anchors, outputs, targets, text_mask, topk=3, alpha=0.4, gamma=1.5)
    assert ref["npos"] >= 2
    want = {
        "loss_dot_product_token": 3.0 * ref["loss_dot_product_token"],
        "loss_reg": 0.5 * ref["loss_reg"] / 2.0,  # the reference applies the default weight 2
        "loss_centerness": 4.0 * ref["loss_centerness"],
    }
    for k, v in want.items():
        assert abs(losses[k].item() - v) < 1e-4 * max(1.0, abs(v)), k
