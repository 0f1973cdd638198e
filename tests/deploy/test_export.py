"""fiber_d2.deploy without tracing: the export graph in eager mode against FIBER.inference, and the
runners' refusal of inputs outside an export's ranges.

A randomly initialised tiny detector (configs/Demo/fine_tiny.yaml with fewer blocks);
``INFERENCE_TH 0`` makes every candidate a detection, so NMS, the pre-NMS top-k and the per-image cut
all act. Exported-vs-eager parity: test_export_parity.py.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime  # noqa: F401  (the deploy extra is part of the test environment)
import pytest
import torch
from tiny_detector import tiny_detector_opts

import fiber_d2  # noqa: F401
from fiber_d2.data.resize import FIBERResizeShortestEdge
from fiber_d2.deploy import (
    ExportableFIBER,
    TorchScriptPredictor,
    check_exportable,
    export_detector,
    graph_inputs,
)
from fiber_d2.deploy.graph import label_scores_batched
from fiber_d2.deploy.runtime import METADATA_FILE, ExportedPredictor
from fiber_d2.deploy.verify import compare_detections
from fiber_d2.engine.setup import load_config
from fiber_d2.modeling.head.postprocess import label_scores

ROOT = Path(__file__).resolve().parents[2]
FINE_CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
COARSE_CFG = str(ROOT / "configs/Demo/coarse_tiny.yaml")
TINY = tiny_detector_opts(min_size=128, max_size=160)
NAMES = ["red circle", "blue square", "green triangle"]
MAX_SIDE = 256
# (height, width) and text lengths never seen by the export (sample: 128 x 160, 30 tokens); the
# second size also changes the number of anchors of the coarsest level (2 -> 4), so a frozen top-k
# size would fail
SIZES = [(96, 224), (256, 192)]
TEXT_LENGTHS = [17, 41]


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


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
    """Same detections (count and labels per image), boxes within 1e-4, scores within 1e-5."""
    result = compare_detections(got, ref)
    assert result["ok"], result


def test_compare_detections():
    ref = (
        torch.tensor([0, 0, 1]),
        torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]]),
        torch.tensor([0.5, 0.5, 0.9]),
        torch.tensor([1, 1, 0]),
    )
    tied = (ref[0], ref[1][[1, 0, 2]], torch.tensor([0.500001, 0.5, 0.9]), ref[3])  # swapped tie
    assert compare_detections(tied, ref)["ok"]
    moved = (ref[0], ref[1] + torch.tensor([0, 0, 0, 1e-3]), ref[2], ref[3])
    assert not compare_detections(moved, ref)["ok"]
    relabelled = (ref[0], ref[1], ref[2], torch.tensor([1, 2, 0]))
    assert not compare_detections(relabelled, ref)["same_detections"]
    assert not compare_detections(tuple(x[:2] for x in ref), ref)["same_detections"]


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


# ------------------------------------------------------------------ bad input
class _StubRunner(ExportedPredictor):
    """The runners' host side on an export's metadata, without a model file."""

    artifact_key = "onnx"

    def run_graph(self, *inputs):
        raise AssertionError("bad input must be refused before the graph runs")


@pytest.fixture
def stub_runner(tmp_path):
    meta = {
        "format": "onnx", "file": "model.onnx", "tokenizer": "builtin:shapes",
        "max_query_len": 64, "separator": ". ", "chunk_size": -1, "nms_threshold": 0.6, "pad_to_max_query_len": False,
        "min_size_test": 128,
        "max_size_test": 160, "input_format": "BGR", "pixel_mean": [103.53, 116.28, 123.675],
        "pixel_std": [57.375, 57.12, 58.395], "size_divisibility": 32, "min_side": 96,
        "max_side": 256, "max_text_len": 64, "max_batch": 8,
    }  # fmt: skip
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    return _StubRunner(tmp_path)


def test_prompt_longer_than_export(eager, stub_runner):
    records = _records(eager[1], [SIZES[0]], 70, seed=0)
    with pytest.raises(
        ValueError, match="70 tokens is longer than the exported maximum text length 64"
    ):
        stub_runner.detect(records)


def test_image_outside_export_range(eager, stub_runner):
    records = _records(eager[1], [(64, 160)], 20, seed=0)
    with pytest.raises(ValueError, match=r"64x160 is outside the exported range \[96, 256\]"):
        stub_runner.detect(records)
    records = _records(eager[1], [(128, 300)], 20, seed=0)
    with pytest.raises(ValueError, match=r"128x320 is outside the exported range \[96, 256\]"):
        stub_runner.detect(records)


def test_text_of_the_exported_length_is_accepted(stub_runner):
    """max_text_len (64) is the longest text the export takes: 64 tokens pass, 65 are refused."""
    images = torch.zeros(1, 3, 128, 160)
    stub_runner.check_inputs(images, torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="65 tokens is longer than the exported maximum"):
        stub_runner.check_inputs(images, torch.zeros(1, 65, dtype=torch.long))


class _FixedRunner(ExportedPredictor):
    """A runner whose graph returns, per run, two boxes of IoU 1000 / 2200 = 0.45 for the label of
    the prompt chunk's first name (the first row of its label map with tokens)."""

    artifact_key = "onnx"
    runs = 0

    def run_graph(self, images, sizes, ids, mask, label_map):
        _FixedRunner.runs += 1
        label = int(label_map[0].any(dim=1).nonzero()[0])
        boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [25.0, 10.0, 65.0, 50.0]])
        return (
            torch.zeros(2, dtype=torch.long),
            boxes,
            torch.tensor([0.9, 0.8]),
            torch.full((2,), label),
        )


def _fixed_runner(stub_runner, tmp_path, **changes):
    meta = json.loads((stub_runner.export_dir / METADATA_FILE).read_text())
    (tmp_path / "fixed").mkdir()
    (tmp_path / "fixed" / METADATA_FILE).write_text(json.dumps({**meta, **changes}))
    return _FixedRunner(tmp_path / "fixed")


def test_chunked_prompt_runs_every_chunk(stub_runner, tmp_path):
    """With one name per chunk (TEST.CHUNKED_EVALUATION 1), each of the 3 names runs the graph
    once and the detections of all chunks are returned."""
    runner = _fixed_runner(stub_runner, tmp_path, chunk_size=1)
    _FixedRunner.runs = 0
    out = runner(_image(128, 160, 0), NAMES)
    assert _FixedRunner.runs == 3
    assert sorted(out["pred_labels"]) == sorted(NAMES * 2)


def test_class_agnostic_nms_uses_the_exported_iou(stub_runner, tmp_path):
    """class_agnostic_nms=True runs NMS at the export's nms_threshold: at 0.3 the two boxes of IoU
    0.45 are one, at the default 0.6 they stay two."""
    image = _image(128, 160, 0)
    strict = _fixed_runner(stub_runner, tmp_path, nms_threshold=0.3)
    assert len(strict(image, NAMES[:1], class_agnostic_nms=True)["instances"]) == 1
    assert len(strict(image, NAMES[:1], class_agnostic_nms=0.6)["instances"]) == 2


def test_runner_resizes_as_the_original(stub_runner):
    """Exported runners size images as FIBERPredictor and the original do (100 x 130 at short side
    128, long side at most 160: 123 x 159, where detectron2's ResizeShortestEdge gives 123 x 160).
    """
    assert type(stub_runner.aug) is FIBERResizeShortestEdge
    image = np.zeros((100, 130, 3), dtype=np.uint8)
    assert stub_runner.aug.get_transform(image).apply_image(image).shape[:2] == (123, 159)


def test_wrong_runner_for_export(stub_runner):
    with pytest.raises(ValueError, match="holds a 'onnx' export; TorchScriptPredictor runs"):
        TorchScriptPredictor(stub_runner.export_dir)


def test_coarse_config_is_refused():
    cfg = load_config(COARSE_CFG, ["MODEL.DEVICE", "cpu"])
    with pytest.raises(
        ValueError, match="'FIBERCoarse' cannot be exported.*supported: formats onnx"
    ):
        check_exportable(cfg, "onnx")
    with pytest.raises(ValueError, match="unknown export format 'tensorrt'"):
        check_exportable(load_config(FINE_CFG, TINY), "tensorrt")
    cfg = load_config(FINE_CFG, TINY + ["MODEL.SWIN.SHIFT_SINGLE_WINDOW", "False"])
    with pytest.raises(ValueError, match="SHIFT_SINGLE_WINDOW False cannot be exported"):
        check_exportable(cfg, "torchscript")


def test_a_model_off_the_cpu_is_refused(tmp_path):
    cfg = load_config(FINE_CFG, TINY)
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="needs the model on the CPU, got cuda:0"):
        export_detector(cfg, on_gpu, "onnx", tmp_path, [])
    assert not any(tmp_path.iterdir())


def test_a_failed_export_leaves_no_mixed_folder(eager, tmp_path, monkeypatch):
    """An export that failed while writing (a full disk) left a truncated model file beside the
    earlier export's metadata, which the runners then read. Now the files appear whole, the
    metadata last, and the error names the folder."""
    import fiber_d2.deploy.export as export

    cfg, predictor = eager
    (tmp_path / "model.ts").write_bytes(b"the earlier export")
    (tmp_path / METADATA_FILE).write_text("{}")
    records = _records(predictor, [(128, 160)], 20, seed=0)

    def full_disk(wrapper, inputs):
        raise OSError(27, "File too large")

    monkeypatch.setattr(export, "trace_graph", full_disk)
    with pytest.raises(OSError, match=f"cannot write the export in {tmp_path}: .*File too large"):
        export_detector(cfg, predictor.model, "torchscript", tmp_path, records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]  # no metadata, no temporary
    assert (tmp_path / "model.ts").read_bytes() == b"the earlier export"
    with pytest.raises(ValueError, match="max_batch, --max-batch"):
        export_detector(cfg, predictor.model, "torchscript", tmp_path, records, max_batch=0)
