"""Parity with the ORIGINAL FIBER implementation on identical weights.

``../shared/fixtures/original_fine_tiny`` (next to the checkout) holds the original fine-grained code's
own outputs for a tiny FIBER: its weights in the original key layout, the network input, and every
intermediate tensor that fiber_d2 exposes (fused Swin stages, FPN levels, fused text features, the
head's three outputs and the final detections). The weights are converted with the released-checkpoint
converter and every tensor is compared at 1e-4 (measured agreement: 2e-5).

Every test runs twice: ``reference`` (text padded to 256, the whole model in one call, as the
original) and ``improved`` (the performance features on: text cut to the longest prompt rounded up to
8, the prompt run as a chunk through the prefix-reuse path, the recomputing deformable conv); the
improved run is compared on the real tokens.

The model runs on the CPU, or on ``$FIBER_D2_TEST_DEVICE`` (e.g. ``cuda``, in fp32 with TF32 off:
``tools/gpu_report.py`` runs this file there); ``$FIBER_D2_ORIGINAL_FIXTURE`` names another copy of
the fixture folder.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from fiber_d2 import add_fiber_config
from fiber_d2.checkpoint.convert import convert_fine_state_dict

ROOT = Path(__file__).resolve().parents[2]
FIX = Path(
    os.environ.get("FIBER_D2_ORIGINAL_FIXTURE")
    or ROOT.parent / "shared" / "fixtures" / "original_fine_tiny"
)
DEVICE = os.environ.get("FIBER_D2_TEST_DEVICE") or "cpu"
if not (FIX / "expected.safetensors").exists():
    pytest.skip(
        f"original-FIBER fixture not found at {FIX} (../shared/fixtures next to the checkout)",
        allow_module_level=True,
    )

if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"FIBER_D2_TEST_DEVICE={DEVICE}: no CUDA device", allow_module_level=True)

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ATOL = 1e-4


PERFORMANCE_FEATURES = {
    "reference": [
        "INPUT.PAD_TO_MAX_QUERY_LEN",
        True,
        "TEST.PREFIX_REUSE",
        False,
        "MODEL.DYHEAD.DFCONV_RECOMPUTE",
        False,
        "MODEL.LANGUAGE_BACKBONE.CHECKPOINT_CROSS_ATTENTION",
        False,
        "MODEL.SWIN.FUSED_ATTENTION",
        False,
    ],
    "improved": [
        "INPUT.PAD_TO_MAX_QUERY_LEN",
        False,
        "TEST.PREFIX_REUSE",
        True,
        "MODEL.DYHEAD.DFCONV_RECOMPUTE",
        True,
        "MODEL.LANGUAGE_BACKBONE.CHECKPOINT_CROSS_ATTENTION",
        True,
        "MODEL.SWIN.FUSED_ATTENTION",
        True,
    ],
}


@pytest.fixture(scope="module", params=sorted(PERFORMANCE_FEATURES))
def parity(request):
    """Build the tiny model, load the converted original weights, run it once with hooks."""
    cfg = get_cfg()
    add_fiber_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs/FIBER-B/coco.yaml"))
    cfg.merge_from_file(str(FIX / "overrides.yaml"))
    cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER = str(FIX / cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER)
    cfg.merge_from_list(PERFORMANCE_FEATURES[request.param])
    cfg.MODEL.DEVICE = DEVICE
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()

    converted, report = convert_fine_state_dict(
        load_file(str(FIX / "state_original.safetensors")), model_state=model.state_dict()
    )
    incompatible = model.load_state_dict(converted, strict=False)

    captured = {}

    def keep(name):
        def hook(_module, _inputs, output):
            captured[name] = output

        return hook

    handles = [
        model.backbone.bottom_up.register_forward_hook(keep("bottom_up")),
        model.backbone.register_forward_hook(keep("backbone")),
        model.head.register_forward_hook(keep("head")),
    ]
    inputs = load_file(str(FIX / "inputs.safetensors"))
    image = inputs["image"].to(DEVICE)
    images = ImageList(image, [tuple(image.shape[-2:])])
    ids, mask, label_map = (
        inputs[k].to(DEVICE) for k in ("input_ids", "attention_mask", "label_token_map")
    )
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            if request.param == "reference":
                instances = model._detect(images, ids, mask, [label_map])[0]
            else:  # the chunked path: one chunk, prefix reuse, dynamic text length
                instances = model.detect_chunks(images, ids, mask, label_map[None])[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for h in handles:
            h.remove()
    return {
        "report": report,
        "incompatible": incompatible,
        "captured": captured,
        "instances": instances,
        "expected": load_file(str(FIX / "expected.safetensors")),
        "cfg": cfg,
        "inputs": inputs,
    }


def _close(name, actual, expected):
    if actual.shape != expected.shape and actual.dim() == expected.dim():
        # improved run: text cut to T' tokens; compare every real token (the rest is padding)
        token_dim = [i for i, (a, e) in enumerate(zip(actual.shape, expected.shape)) if a != e]
        assert len(token_dim) == 1 and expected.shape[token_dim[0]] == 256, name
        assert actual.shape[token_dim[0]] >= 40  # the 40 real tokens of the prompt
        expected = expected.narrow(token_dim[0], 0, actual.shape[token_dim[0]])
    assert (
        actual.shape == expected.shape
    ), f"{name}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.float().cpu() - expected.float()).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs diff {diff:.3g} > {ATOL}"


def test_conversion_is_complete(parity):
    incompatible = parity["incompatible"]
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert parity["report"].shape_mismatches == []
    assert len(parity["report"].mapped) == 776


def test_backbone_fpn_and_text_match(parity):
    expected, captured = parity["expected"], parity["captured"]
    swin = captured["bottom_up"][0]
    for level in ("res2", "res3", "res4", "res5"):
        _close(f"swin.{level}", swin[level], expected[f"swin.{level}"])
    fpn, text = captured["backbone"]
    for level in ("p3", "p4", "p5", "p6", "p7"):
        _close(f"fpn.{level}", fpn[level], expected[f"fpn.{level}"])
    _close("text.hidden", text["hidden"], expected["text.hidden"])
    _close("text.embedded", text["embedded"], expected["text.embedded"])


def test_head_outputs_match(parity):
    expected, head = parity["expected"], parity["captured"]["head"]
    for level_index, level in enumerate(("p3", "p4", "p5", "p6", "p7")):
        for key in ("box_regression", "centerness", "token_logits"):
            _close(f"head.{key}.{level}", head[key][level_index], expected[f"head.{key}.{level}"])


def test_detections_match(parity):
    expected, inst = parity["expected"], parity["instances"]
    exp_boxes, exp_scores, exp_labels = (
        expected["det.boxes"],
        expected["det.scores"],
        expected["det.labels"],
    )
    inst = inst.to("cpu")
    boxes, scores = inst.pred_boxes.tensor, inst.scores
    labels = inst.pred_classes + 1
    assert len(inst) == len(exp_labels)
    assert sorted(labels.tolist()) == sorted(exp_labels.tolist())
    used = torch.zeros(len(inst), dtype=torch.bool)
    for box, score, label in zip(exp_boxes, exp_scores, exp_labels):
        candidates = ((labels == label) & ~used).nonzero().flatten()
        assert len(candidates), f"no fiber_d2 detection left for label {int(label)}"
        nearest = candidates[(boxes[candidates] - box).abs().sum(1).argmin()]
        used[nearest] = True
        _close(f"det.box (label {int(label)})", boxes[nearest], box)
        _close(f"det.score (label {int(label)})", scores[nearest], score)


def test_prompt_tokenizes_to_the_original_ids(parity):
    from fiber_d2.text import build_tokenizer, tokenize

    with safe_open(str(FIX / "inputs.safetensors"), "pt") as f:
        meta = f.metadata()
    tokenizer = build_tokenizer(parity["cfg"].MODEL.LANGUAGE_BACKBONE.TOKENIZER)
    encoding = tokenize(tokenizer, meta["prompt"], 256)
    assert torch.equal(encoding["input_ids"], parity["inputs"]["input_ids"])
    assert torch.equal(encoding["attention_mask"], parity["inputs"]["attention_mask"])
    assert len(json.loads(meta["category_names"])) == 12
