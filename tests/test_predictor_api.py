"""FIBERPredictor's user-facing API: input kinds, threshold / class-agnostic NMS / top-k, text labels,
dtype (autocast), drawing, COCO json, one-line errors, and detectron2's DefaultPredictor pointing here.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances
from PIL import Image
from tiny_detector import tiny_detector_opts

import fiber_d2
from fiber_d2 import FIBERPredictor, to_coco_json
from fiber_d2.engine.setup import load_config
from fiber_d2.predictor import resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
TINY = tiny_detector_opts()
NAMES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return FIBERPredictor(load_config(CFG, TINY))


@pytest.fixture(scope="module")
def bgr():
    return np.random.default_rng(7).integers(0, 256, (53, 71, 3), dtype=np.uint8)


def _same(a, b):
    assert a["label_names"] == b["label_names"] and a["pred_labels"] == b["pred_labels"]
    torch.testing.assert_close(a["instances"].scores, b["instances"].scores)
    torch.testing.assert_close(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_top_level_exports():
    for name in ("FIBERPredictor", "register_grounding_coco", "draw_grounding", "model_zoo"):
        assert hasattr(fiber_d2, name) and name in fiber_d2.__all__


def test_every_input_kind_gives_the_same_result(predictor, bgr, tmp_path):
    ref = predictor(bgr, NAMES)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    _same(ref, predictor(rgb, NAMES, image_format="RGB"))
    _same(ref, predictor(Image.fromarray(rgb), NAMES))
    _same(ref, predictor(str(path), NAMES))
    _same(ref, predictor(path, NAMES))
    chw = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # torchvision: RGB (3, H, W)
    _same(ref, predictor(chw, NAMES))
    both = predictor(torch.stack([chw, chw]), [NAMES, NAMES])
    assert len(both) == 2
    _same(ref, both[1])
    mixed = predictor([str(path), Image.fromarray(rgb)], [NAMES, NAMES])
    _same(ref, mixed[0])


def test_labels_threshold_nms_and_top_k(predictor, bgr):
    out = predictor(bgr, NAMES)
    inst = out["instances"]
    assert len(inst) == 20
    assert (inst.scores[:-1] >= inst.scores[1:]).all()  # sorted by score
    assert out["pred_labels"] == [NAMES[int(c)] for c in inst.pred_classes]
    median = float(inst.scores.median())
    kept = predictor(bgr, NAMES, threshold=median)["instances"]
    assert len(kept) == int((inst.scores >= median).sum()) and (kept.scores >= median).all()
    top = predictor(bgr, NAMES, max_detections=4)
    assert len(top["instances"]) == 4 and len(top["pred_labels"]) == 4
    torch.testing.assert_close(top["instances"].scores, inst.scores[:4])

    from torchvision.ops import box_iou

    agnostic = predictor(bgr, NAMES, class_agnostic_nms=0.5)["instances"]
    iou = box_iou(agnostic.pred_boxes.tensor, agnostic.pred_boxes.tensor)
    iou.fill_diagonal_(0)
    assert (iou <= 0.5).all()  # one box per object, whatever its label
    per_label = box_iou(inst.pred_boxes.tensor, inst.pred_boxes.tensor).fill_diagonal_(0)
    assert (per_label > 0.5).any()  # without it, overlapping boxes of different labels remain
    assert 0 < len(agnostic) < len(inst)


def test_query_length_is_read_from_the_model(predictor):
    direct = FIBERPredictor(model=predictor.model, tokenizer=predictor.tokenizer)
    assert direct.max_query_len == predictor.max_query_len == 64


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_dtypes_run_and_return_float32(predictor, bgr, dtype):
    fast = FIBERPredictor(
        model=predictor.model,
        tokenizer=predictor.tokenizer,
        min_size_test=64,
        max_size_test=96,
        dtype=dtype,
    )
    ref = predictor(bgr, NAMES, max_detections=5)
    out = fast(bgr, NAMES, max_detections=5)
    inst = out["instances"]
    assert inst.scores.dtype == torch.float32 and inst.pred_boxes.tensor.dtype == torch.float32
    assert len(inst) == 5 and torch.isfinite(inst.pred_boxes.tensor).all()
    # same top detection up to reduced-precision noise
    assert abs(float(inst.scores[0]) - float(ref["instances"].scores[0])) < 0.05


def test_bad_threshold_dtype_and_options_are_one_line(predictor, bgr):
    for value in (-0.1, 1.5, "high"):
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
            predictor(bgr, NAMES, threshold=value)
    with pytest.raises(ValueError, match="unknown dtype 'int8'; use one of fp32, bf16, fp16"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="unknown dtype"):
        FIBERPredictor.from_pretrained("demo", dtype="half-ish")
    with pytest.raises(ValueError, match="max_detections must be a positive int"):
        predictor(bgr, NAMES, max_detections=0)
    with pytest.raises(ValueError, match="image_format must be 'BGR' or 'RGB'"):
        predictor(bgr, NAMES, image_format="HSV")
    with pytest.raises(ValueError, match="numpy array, PIL image, path or tensor"):
        predictor([[1, 2, 3]], [NAMES])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_cuda_device_without_cuda_is_one_line(predictor):
    """Not torch's driver error from ``model.to("cuda")``; the command-line demo falls back to
    the CPU with a warning instead."""
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device '{device}': no CUDA device is available"):
            FIBERPredictor(model=predictor.model, tokenizer=predictor.tokenizer, device=device)


def test_unreadable_image_file_is_one_line(predictor, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        predictor(str(bad), NAMES)


def test_draw_and_coco_json(predictor, bgr):
    out = predictor(bgr, NAMES, max_detections=3)
    picture = predictor.draw(bgr, out, threshold=0.0)
    assert picture.dtype == np.uint8 and min(picture.shape[:2]) >= 512
    records = to_coco_json([out, out], [11, 12])
    assert len(records) == 6 and {r["image_id"] for r in records} == {11, 12}
    x1, y1, x2, y2 = out["instances"].pred_boxes.tensor[0].tolist()
    first = records[0]
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert first["label"] == out["pred_labels"][0]
    assert first["category_id"] == int(out["instances"].pred_classes[0]) + 1
    ids = to_coco_json(out, 5, category_ids=[10, 20, 30])
    assert [r["category_id"] for r in ids] == [
        [10, 20, 30][int(c)] for c in out["instances"].pred_classes
    ]
    with pytest.raises(ValueError, match="2 results need 2 image ids"):
        to_coco_json([out, out], [1])


def test_draw_shows_a_bgr_image_in_rgb(predictor):
    """draw returns RGB: a pure blue BGR image (255, 0, 0) is drawn as RGB (0, 0, 255)."""
    blue = np.zeros((20, 30, 3), np.uint8)
    blue[..., 0] = 255
    inst = Instances((20, 30))
    inst.pred_boxes = Boxes(torch.zeros(0, 4))
    inst.scores = torch.zeros(0)
    inst.pred_classes = torch.zeros(0, dtype=torch.long)
    result = {"instances": inst, "label_names": NAMES, "pred_labels": [], "caption": ""}
    picture = predictor.draw(blue, result)
    assert picture[10, 10].tolist() == [0, 0, 255]


def test_class_agnostic_nms_uses_the_configs_iou(predictor, bgr):
    """class_agnostic_nms=True runs NMS at the config's MODEL.ATSS.NMS_TH."""
    torch.manual_seed(0)
    loose = FIBERPredictor(load_config(CFG, TINY + ["MODEL.ATSS.NMS_TH", "0.1"]))
    assert loose.nms_threshold == 0.1
    _same(loose(bgr, NAMES, class_agnostic_nms=True), loose(bgr, NAMES, class_agnostic_nms=0.1))
    agnostic = loose(bgr, NAMES, class_agnostic_nms=True)["instances"]
    assert len(agnostic) < len(predictor(bgr, NAMES, class_agnostic_nms=True)["instances"])


def test_detectron2_default_predictor_points_to_fiber_predictor(bgr):
    from detectron2.engine import DefaultPredictor

    d2 = DefaultPredictor(load_config(CFG, TINY))
    with pytest.raises(ValueError, match="predict with fiber_d2.FIBERPredictor") as err:
        d2(bgr)
    assert "\n" not in str(err.value)


def test_training_without_text_points_to_fiber_trainer():
    """What detectron2's DefaultTrainer feeds (its DatasetMapper: image and boxes, no prompt)."""
    from detectron2.modeling import build_model

    model = build_model(load_config(CFG, TINY)).train()
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 30.0]]))
    inst.gt_classes = torch.tensor([0])
    batch = [{"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "instances": inst}]
    with pytest.raises(ValueError, match="train with fiber_d2.engine.FIBERTrainer") as err:
        model(batch)
    assert "\n" not in str(err.value)


def test_draw_grounding_accepts_predictor_output(predictor, bgr):
    inst = Instances((53, 71))
    inst.pred_boxes = Boxes(torch.tensor([[5.0, 5.0, 30.0, 30.0]]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([1])
    picture = fiber_d2.draw_grounding(bgr[:, :, ::-1], inst, NAMES, 0.5)
    assert min(picture.shape[:2]) >= 512


def test_a_local_file_of_another_architecture_without_config_names_the_config(tmp_path):
    """Without ``config`` a local file is taken for FIBER-B; a Demo checkpoint then failed with a
    hint to load it partially (a random model), not to name its config."""
    from detectron2.modeling import build_model

    from fiber_d2 import model_zoo

    cfg = model_zoo.get_config("demo")
    cfg.MODEL.DEVICE = "cpu"
    path = tmp_path / "mine.pth"
    torch.save({"model": build_model(cfg).state_dict()}, path)
    with pytest.raises(ValueError) as err:
        FIBERPredictor.from_pretrained(path, device="cpu")
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "no config was given" in message and "config= / --config-file" in message
    predictor = FIBERPredictor.from_pretrained(path, config="demo", device="cpu")  # named: loads
    assert predictor.model.training is False


def test_a_coarse_stage_checkpoint_is_refused_by_the_predictor(tmp_path):
    """The predictor loaded a coarse-stage file into the detector as a training hand-off (its FPN
    and head left random) without a word."""
    from detectron2.modeling import build_model

    from fiber_d2.engine.setup import load_config

    cfg = load_config("configs/Demo/coarse_tiny.yaml", ["MODEL.DEVICE", "cpu"])
    path = tmp_path / "coarse.pth"
    torch.save({"model": build_model(cfg).state_dict()}, path)
    with pytest.raises(ValueError, match="coarse-stage checkpoint has no detector head"):
        FIBERPredictor.from_pretrained(path, config="demo", device="cpu")
