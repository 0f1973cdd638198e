"""Exported-vs-eager parity of the ONNX (onnxruntime) and TorchScript exports.

One export per format of the tiny detector, traced on a 128 x 160 image with a 30-token prompt, is
run on image sizes and text lengths it never saw (``SIZES``, ``TEXT_LENGTHS``), one image and a
batch of two, and must give eager's detections: same count and labels, boxes within 1e-4, scores
within 1e-5.
"""

import pytest
import torch
from test_export import (
    MAX_SIDE,
    NAMES,
    SIZES,
    TEXT_LENGTHS,
    _assert_same,
    _image,
    _records,
    _sorted,
)

from fiber_d2.deploy import (
    ExportableFIBER,
    ONNXPredictor,
    TorchScriptPredictor,
    export_detector,
    graph_inputs,
)

SAMPLE_SIZE, SAMPLE_LENGTH = (128, 160), 30
RUNNERS = {"onnx": ONNXPredictor, "torchscript": TorchScriptPredictor}


@pytest.fixture(scope="module")
def exports(eager, tmp_path_factory):
    cfg, predictor = eager
    records = _records(predictor, [SAMPLE_SIZE], SAMPLE_LENGTH, seed=99)
    root = tmp_path_factory.mktemp("export")
    runners = {}
    for fmt, runner_cls in RUNNERS.items():
        export_detector(cfg, predictor.model, fmt, root / fmt, records, max_side=MAX_SIDE)
        runners[fmt] = runner_cls(root / fmt)
    return runners


@pytest.mark.parametrize("fmt", sorted(RUNNERS))
@pytest.mark.parametrize("length", TEXT_LENGTHS)
def test_exported_graph_parity(eager, exports, fmt, length):
    cfg, predictor = eager
    wrapper = ExportableFIBER(predictor.model)
    runner = exports[fmt]
    for sizes in ([SIZES[0]], [SIZES[1]], SIZES):
        records = _records(predictor, sizes, length, seed=length)
        inputs = graph_inputs(records, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, 32)
        assert tuple(inputs[0].shape[-2:]) != SAMPLE_SIZE and length != SAMPLE_LENGTH
        runner.check_inputs(inputs[0], inputs[2])
        with torch.no_grad():
            ref = wrapper(*inputs)
        assert ref[0].numel() > 0
        _assert_same(runner.run_graph(*inputs), ref)


@pytest.mark.parametrize("fmt", sorted(RUNNERS))
def test_predictor_switch(eager, exports, fmt):
    """Same call, same outputs: names prompt, caption with phrases, a batch of two images."""
    _, predictor = eager
    runner = exports[fmt]
    calls = [
        ((_image(100, 150, 1), NAMES), {}),
        ((_image(150, 120, 2), "a red circle left of a blue square"), {"phrases": ["blue square"]}),
        (([_image(90, 130, 3), _image(130, 90, 4)], [NAMES[:2], NAMES]), {}),
    ]
    for args, kwargs in calls:
        ref, got = predictor(*args, **kwargs), runner(*args, **kwargs)
        refs, gots = (ref, got) if isinstance(ref, list) else ([ref], [got])
        for r, g in zip(refs, gots):
            assert g["label_names"] == r["label_names"] and g["caption"] == r["caption"]
            ri, gi = r["instances"], g["instances"]
            assert gi.image_size == ri.image_size and len(gi) == len(ri) > 0
            rb, rs, rl = _sorted(ri.pred_boxes.tensor, ri.scores, ri.pred_classes)
            gb, gs, gl = _sorted(gi.pred_boxes.tensor, gi.scores, gi.pred_classes)
            assert torch.equal(gl, rl)
            torch.testing.assert_close(gb, rb, rtol=0, atol=1e-3)  # boxes rescaled to the original
            torch.testing.assert_close(gs, rs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", sorted(RUNNERS))
def test_real_export_refuses_inputs_out_of_range(eager, exports, fmt):
    _, predictor = eager
    runner = exports[fmt]
    max_text = runner.meta["max_text_len"]
    with pytest.raises(
        ValueError, match=f"longer than the exported maximum text length {max_text}"
    ):
        runner.detect(_records(predictor, [SAMPLE_SIZE], max_text + 8, seed=0))
    with pytest.raises(
        ValueError, match=rf"288x160 is outside the exported range \[96, {MAX_SIDE}\]"
    ):
        runner.detect(_records(predictor, [(288, 160)], 20, seed=0))
