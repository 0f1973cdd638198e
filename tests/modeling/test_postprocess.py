"""Grounding inference: label aggregation, thresholds, NMS, caps and clipping."""

import math

import pytest
import torch

from fiber_d2.modeling.head.postprocess import ground_inference, label_scores


def _logit(p):
    return math.log(p / (1 - p))


def _outputs(token_probs, ctr_logits, deltas=None):
    """One image, one level laid out as a 1 x N map. token_probs: (N, T) probabilities."""
    probs = torch.tensor(token_probs, dtype=torch.float64)
    n = probs.shape[0]
    logits = torch.log(probs / (1 - probs)).float()
    deltas = torch.zeros(n, 4) if deltas is None else torch.tensor(deltas, dtype=torch.float32)
    return {
        "box_regression": [deltas.t().reshape(1, 4, 1, n)],
        "centerness": [torch.tensor(ctr_logits, dtype=torch.float32).reshape(1, 1, 1, n)],
        "token_logits": [logits[None]],
    }


def _run(anchors, outputs, label_map, size=(200, 300), mask=None, **kw):
    return ground_inference(
        [torch.tensor(a, dtype=torch.float32) for a in anchors],
        outputs,
        [torch.tensor(label_map, dtype=torch.bool)],
        [size],
        mask,
        **kw,
    )[0]


def test_label_scores_mean_and_max_by_hand():
    probs = torch.tensor([[0.2, 0.6, 0.1, 0.9], [0.5, 0.3, 0.7, 0.0]])
    label_map = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    mean = label_scores(probs, label_map, "MEAN")
    mx = label_scores(probs, label_map, "MAX")
    torch.testing.assert_close(mean, torch.tensor([[0.4, 0.5, 0.0], [0.4, 0.35, 0.0]]))
    torch.testing.assert_close(mx, torch.tensor([[0.6, 0.9, 0.0], [0.5, 0.7, 0.0]]))
    with pytest.raises(ValueError, match="score_agg"):
        label_scores(probs, label_map, "SUM")


def test_threshold_applies_before_centerness():
    anchors = [[[0, 0, 9, 9], [100, 100, 109, 109]]]
    # anchor 0: label 0 at 0.06 with centerness 0.5 (product 0.03, kept);
    # anchor 1: label 1 at 0.04 with centerness ~1 (product ~0.04, dropped).
    out = _outputs([[0.06, 1e-6], [1e-6, 0.04]], [0.0, 20.0])
    res = _run(anchors, out, [[1, 0], [0, 1]])
    assert len(res) == 1
    assert res.pred_classes.tolist() == [0]
    assert abs(res.scores.item() - math.sqrt(0.06 * 0.5)) < 1e-5
    assert res.pred_boxes.tensor.tolist() == [[0.0, 0.0, 9.0, 9.0]]


def test_mean_versus_max_in_pipeline_and_decode():
    anchors = [[[0, 0, 9, 9]]]
    out = _outputs([[0.1, 0.02, 1e-6]], [0.0], deltas=[[10.0, 0.0, 0.0, 0.0]])
    res_mean = _run(anchors, out, [[1, 1, 0]], score_agg="MEAN")
    res_max = _run(anchors, out, [[1, 1, 0]], score_agg="MAX")
    assert abs(res_mean.scores.item() - math.sqrt(0.06 * 0.5)) < 1e-5
    assert abs(res_max.scores.item() - math.sqrt(0.1 * 0.5)) < 1e-5
    # dx = 10 / 10 = 1 anchor width: centre 4.5 -> 14.5.
    torch.testing.assert_close(res_mean.pred_boxes.tensor, torch.tensor([[10.0, 0.0, 19.0, 9.0]]))


def test_nms_is_class_aware_with_plus_one_iou():
    # Legacy IoU of the two boxes is 50/150 = 0.333 (plain IoU 36/126 = 0.286).
    anchors = [[[0, 0, 9, 9], [5, 0, 14, 9]]]
    same = _outputs([[0.9, 1e-6], [0.8, 1e-6]], [0.0, 0.0])
    res = _run(anchors, same, [[1, 0], [0, 1]], nms_threshold=0.3)
    assert res.pred_classes.tolist() == [0]
    assert res.pred_boxes.tensor.tolist() == [[0.0, 0.0, 9.0, 9.0]]
    different = _outputs([[0.9, 1e-6], [1e-6, 0.8]], [0.0, 0.0])
    res = _run(anchors, different, [[1, 0], [0, 1]], nms_threshold=0.3)
    assert sorted(res.pred_classes.tolist()) == [0, 1]


def test_detection_cap_keeps_best_and_ties_at_the_cut():
    anchors = [[[20 * i, 0, 20 * i + 9, 9] for i in range(6)]]
    probs = [0.3, 0.9, 0.5, 0.7, 0.2, 0.6]
    out = _outputs([[p] for p in probs], [0.0] * 6)
    res = _run(anchors, out, [[1]], detections_per_img=3)
    expected = [math.sqrt(p * 0.5) for p in (0.9, 0.7, 0.6)]
    assert sorted(res.scores.tolist(), reverse=True) == pytest.approx(expected, abs=1e-5)
    tied = _outputs([[p] for p in (0.9, 0.7, 0.7, 0.2, 0.1, 0.3)], [0.0] * 6)
    assert len(_run(anchors, tied, [[1]], detections_per_img=2)) == 3


def test_pre_nms_top_n_is_per_level():
    level0 = [[20 * i, 0, 20 * i + 9, 9] for i in range(3)]
    level1 = [[20 * i, 50, 20 * i + 9, 59] for i in range(3)]
    a = _outputs([[0.9], [0.8], [0.7]], [0.0] * 3)
    b = _outputs([[0.3], [0.2], [0.1]], [0.0] * 3)
    outputs = {k: a[k] + b[k] for k in a}
    res = _run([level0, level1], outputs, [[1]], pre_nms_top_n=2)
    got = sorted(res.scores.tolist(), reverse=True)
    assert got == pytest.approx([math.sqrt(p * 0.5) for p in (0.9, 0.8, 0.3, 0.2)], abs=1e-5)


def test_boxes_are_clipped_to_image():
    out = _outputs([[0.9]], [0.0])
    res = _run([[[-28, -28, 35, 35]]], out, [[1]], size=(20, 30))
    assert res.pred_boxes.tensor.tolist() == [[0.0, 0.0, 29.0, 19.0]]
    assert res.image_size == (20, 30)


def test_padding_tokens_never_score_and_empty_output():
    out = _outputs([[1e-6, 0.9]], [0.0])
    mask = torch.tensor([[1, 0]])
    res = _run([[[0, 0, 9, 9]]], out, [[1, 0], [0, 1]], mask=mask)
    assert len(res) == 0
    assert res.pred_boxes.tensor.shape == (0, 4)
    res = _run([[[0, 0, 9, 9]]], out, [[1, 0], [0, 1]], mask=None)
    assert res.pred_classes.tolist() == [1]
