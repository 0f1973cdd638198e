"""Export parity: ONNX (onnxruntime) and torch.export programs of a tiny FIBER against eager.

A randomly initialised tiny detector (configs/Demo/fine_tiny.yaml with fewer blocks);
``INFERENCE_TH 0`` makes every candidate a detection, so NMS, the pre-NMS top-k and the per-image cut
all act. One ``torch.export`` trace (batch 2 at 128 x 160, 64 tokens) is saved as a ``.pt2`` program
and converted to ONNX; parity is checked at image sizes and text lengths not seen at export time.
"""

from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401  (the deploy extra is part of the test environment)
import pytest
import torch

import fiber_d2  # noqa: F401
from fiber_d2.deploy import (
    ExportableFIBER,
    ONNXPredictor,
    TorchExportPredictor,
    check_exportable,
    export_detector,
    graph_inputs,
)
from fiber_d2.deploy.graph import label_scores_batched
from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.head.postprocess import label_scores
from fiber_d2.predictor import FIBERPredictor

ROOT = Path(__file__).resolve().parents[2]
FINE_CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
COARSE_CFG = str(ROOT / "configs/Demo/coarse_tiny.yaml")
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.ATSS.INFERENCE_TH", "0.0",
    "MODEL.ATSS.PRE_NMS_TOP_N", "50",
    "MODEL.ATSS.DETECTIONS_PER_IMG", "20",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "160",
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
]  # fmt: skip
NAMES = ["red circle", "blue square", "green triangle"]
MAX_SIDE = 256
# (height, width) and text lengths never seen by the export (128 x 160, 64 tokens)
SIZES = [(96, 224), (192, 128)]
TEXT_LENGTHS = [17, 41]


@pytest.fixture(scope="module")
def eager():
    torch.manual_seed(0)
    cfg = load_config(FINE_CFG, TINY)
    predictor = FIBERPredictor(cfg)
    # sharper token logits than the random init gives, so that scores spread over (0, 1)
    with torch.no_grad():
        predictor.model.head.log_scale.fill_(-2.0)
    return cfg, predictor


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exports(eager, tmp_path_factory):
    cfg, predictor = eager
    record = predictor.preprocess_image(_image(128, 160, 0))
    text = predictor.encode(NAMES)
    record.update({k: text[k] for k in ("input_ids", "attention_mask", "label_token_map")})
    root = tmp_path_factory.mktemp("export")
    pt2 = export_detector(
        cfg, predictor.model, "torch.export", root / "pt2", [record], max_side=MAX_SIDE
    )
    program = torch.export.load(str(pt2))
    export_detector(
        cfg, predictor.model, "onnx", root / "onnx", [record], max_side=MAX_SIDE, program=program
    )
    return {
        "torch.export": TorchExportPredictor(root / "pt2"),
        "onnx": ONNXPredictor(root / "onnx"),
    }


def _records(predictor, sizes, length, seed):
    """Mapper-style records: random images of ``sizes``, a random prompt cut to ``length`` tokens."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i, (h, w) in enumerate(sizes):
        ids = torch.randint(5, 1000, (length,), generator=g)
        ids[0], ids[length - 1] = 0, 2
        mask = torch.ones(length, dtype=torch.long)
        mask[length - 3 :] = 0  # some padding
        label_map = torch.zeros(4 + i, length, dtype=torch.bool)
        for label in range(label_map.shape[0]):
            label_map[label, 1 + 3 * label : 3 + 3 * label] = True
        image = torch.as_tensor(_image(h, w, seed + i).transpose(2, 0, 1).copy())
        records.append(
            dict(image=image, input_ids=ids, attention_mask=mask, label_token_map=label_map)
        )
    return records


def _sorted(boxes, scores, labels):
    """Detections ordered by score (5 decimals, so that float noise cannot swap them), label, box."""
    boxes, scores, labels = (torch.as_tensor(np.asarray(x)) for x in (boxes, scores, labels))
    keys = [boxes[:, 1].numpy(), boxes[:, 0].numpy(), labels.numpy(), -np.round(scores.numpy(), 5)]
    order = torch.as_tensor(np.lexsort(keys))
    return boxes[order].float(), scores[order].float(), labels[order].long()


def _assert_same(got, ref):
    got_index, ref_index = (torch.as_tensor(np.asarray(x[0])) for x in (got, ref))
    assert torch.equal(got_index.bincount(minlength=4), ref_index.bincount(minlength=4))
    for i in range(int(ref_index.max()) + 1 if ref_index.numel() else 0):
        g = _sorted(*(np.asarray(x)[got_index.numpy() == i] for x in got[1:]))
        r = _sorted(*(np.asarray(x)[ref_index.numpy() == i] for x in ref[1:]))
        assert torch.equal(g[2], r[2])
        torch.testing.assert_close(g[0], r[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(g[1], r[1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the graph in eager mode
def test_graph_equals_fiber_inference(eager):
    """The export-friendly batched post-processing gives FIBER._detect's detections exactly."""
    cfg, predictor = eager
    model = predictor.model
    records = _records(predictor, [(128, 160), (96, 128)], 30, seed=3)
    inputs = graph_inputs(records, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, 32)
    with torch.no_grad():
        batch_index, boxes, scores, labels = ExportableFIBER(model)(*inputs)
        images = model.preprocess_image(records)
        ids, mask = model._stack_text(records)
        ref = model._detect(images, ids, mask, [r["label_token_map"] for r in records])
    for i, inst in enumerate(ref):
        sel = batch_index == i
        assert len(inst) == int(sel.sum()) > 0
        torch.testing.assert_close(boxes[sel], inst.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(scores[sel], inst.scores, rtol=0, atol=0)
        assert torch.equal(labels[sel], inst.pred_classes)


@pytest.mark.parametrize("agg", ["MEAN", "MAX"])
def test_label_scores_batched(agg):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 7, 9, generator=g)
    member = torch.rand(2, 3, 9, generator=g) > 0.6
    member[1, 2] = False  # a label without tokens
    got = label_scores_batched(probs, member, agg)
    for i in range(2):
        torch.testing.assert_close(got[i], label_scores(probs[i], member[i], agg))


# ------------------------------------------------------------------ exported vs eager
@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
@pytest.mark.parametrize("length", TEXT_LENGTHS)
def test_exported_graph_parity(eager, exports, fmt, length):
    cfg, predictor = eager
    wrapper = ExportableFIBER(predictor.model)
    runner = exports[fmt]
    for sizes in ([SIZES[0]], [SIZES[1]], SIZES):
        records = _records(predictor, sizes, length, seed=length)
        inputs = graph_inputs(records, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, 32)
        runner.check_inputs(inputs[0], inputs[2])
        with torch.no_grad():
            ref = wrapper(*inputs)
        assert ref[0].numel() > 0
        _assert_same(runner.run_graph(*inputs), ref)


@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
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


# ------------------------------------------------------------------ bad input
def test_prompt_longer_than_export(eager, exports):
    _, predictor = eager
    records = _records(predictor, [SIZES[0]], 70, seed=0)
    with pytest.raises(
        ValueError, match="70 tokens is longer than the exported maximum text length 64"
    ):
        exports["onnx"].detect(records)


def test_image_outside_export_range(eager, exports):
    _, predictor = eager
    records = _records(predictor, [(64, 160)], 20, seed=0)
    with pytest.raises(ValueError, match=r"64x160 is outside the exported range \[96, 256\]"):
        exports["torch.export"].detect(records)
    records = _records(predictor, [(128, 300)], 20, seed=0)
    with pytest.raises(ValueError, match=r"128x320 is outside the exported range \[96, 256\]"):
        exports["onnx"].detect(records)


def test_wrong_runner_for_export(exports):
    with pytest.raises(ValueError, match="holds a 'onnx' export; TorchExportPredictor runs"):
        TorchExportPredictor(exports["onnx"].export_dir)


def test_coarse_config_is_refused():
    cfg = load_config(COARSE_CFG, ["MODEL.DEVICE", "cpu"])
    with pytest.raises(
        ValueError, match="'FIBERCoarse' cannot be exported.*supported: formats onnx"
    ):
        check_exportable(cfg, "onnx")
    with pytest.raises(ValueError, match="unknown export format 'tensorrt'"):
        check_exportable(load_config(FINE_CFG, TINY), "tensorrt")


def test_torchscript_fixed_size(eager, tmp_path):
    """TorchScript (traced) reproduces eager at its export size and refuses any other size."""
    from fiber_d2.deploy import TorchScriptPredictor

    cfg, predictor = eager
    records = _records(predictor, [(96, 160)], 23, seed=7)
    export_detector(cfg, predictor.model, "torchscript", tmp_path, records)
    runner = TorchScriptPredictor(tmp_path)
    records = _records(predictor, [(96, 160)], 23, seed=8)  # other pixels and tokens
    inputs = graph_inputs(records, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, 32)
    with torch.no_grad():
        ref = ExportableFIBER(predictor.model)(*inputs)
    assert ref[0].numel() > 0
    _assert_same(runner.run_graph(*inputs), ref)
    with pytest.raises(ValueError, match="runs padded images of 96x160 and 23 tokens only"):
        runner.detect(_records(predictor, [(128, 160)], 23, seed=7))
