"""Tests of fiber_d2.checkpoint.convert (released FIBER checkpoints -> fiber_d2 state dicts).

Originals are generated from the tiny Demo models by an independent inverse of the spec tables
(conftest.py); every converted file is loaded with FIBERCheckpointer into a fresh model and compared
tensor by tensor.
"""

from collections import Counter
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple

from fiber_d2.checkpoint import convert as C
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
# every key and shape of the original FIBER-B fine model (released COCO config), from the spec
SPEC_TSV = Path(__file__).with_name("fiber_b_fine_keys.tsv")


def _save(tmp_path, state, name="converted.pth"):
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def _assert_values(model, expected, keys):
    state = model.state_dict()
    for k in keys:
        assert torch.equal(state[k], expected[k]), k


# ------------------------------------------------------------------------------ fine-grained layout
def test_fine_layout_lands_in_every_parameter(fine_model, fresh, originals, load_file, tmp_path):
    model_state = fine_model.state_dict()
    original, expected, extras = originals.make_fine(model_state, seed=1)
    container = {"model": original, "optimizer": {"state": {}}, "iteration": 90000}
    converted, report = C.convert_fine_state_dict(container, model_state=model_state)

    assert report.source == "model" and report.stripped_module_prefix
    assert sorted(converted) == sorted(model_state)
    assert len(report.mapped) == len(model_state)
    # only the recomputed buffers are skipped: one relative_position_index per Swin block,
    # position_ids, and the five anchor-generator cell anchors
    assert sorted(k for k, _ in report.skipped) == extras
    assert {r for _, r in report.skipped} == {C.RECOMPUTED_BUFFER}
    num_blocks = sum(1 for k in model_state if k.endswith("relative_position_bias_table"))
    assert len(extras) == num_blocks + 1 + 5
    assert report.shape_mismatches == [] and report.missing_in_checkpoint == []

    model = fresh.fine()
    incompatible = load_file(model, _save(tmp_path, converted))
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    _assert_values(model, expected, model_state)


def test_fine_head_and_fpn_names(fine_model, originals):
    model_state = fine_model.state_dict()
    original, _, _ = originals.make_fine(model_state, prefix="")
    converted, report = C.convert_fine_state_dict(original)
    pairs = dict(report.mapped)
    assert not report.stripped_module_prefix and report.source == "<flat>"
    assert (
        pairs["rpn.head.dyhead_tower.1.DyConv.2.conv.weight"]
        == "head.dyhead_tower.1.DyConv.2.conv.weight"
    )
    assert pairs["rpn.head.bias_lang"] == "head.bias_lang"
    assert pairs["fusion_backbone.backbone.fpn.fpn_inner2.weight"] == "backbone.fpn_lateral3.weight"
    assert pairs["fusion_backbone.backbone.fpn.fpn_layer4.bias"] == "backbone.fpn_output5.bias"
    assert pairs["fusion_backbone.backbone.body.layers.0.downsample.reduction.weight"] == (
        "backbone.bottom_up.image_tower.layers.1.downsample.reduction.weight"
    )
    assert torch.equal(converted["head.scales.3.scale"], original["rpn.head.scales.3.scale"])


def test_shape_mismatch_is_reported_not_written(fine_model, fresh, originals, load_file, tmp_path):
    model_state = fine_model.state_dict()
    original, expected, _ = originals.make_fine(model_state, seed=2)
    # a checkpoint trained with another NUM_CLASSES: cls_logits has 5 outputs instead of 12
    original["module.rpn.head.cls_logits.weight"] = torch.randn(5, 64, 1, 1)
    original["module.rpn.head.cls_logits.bias"] = torch.randn(5)
    converted, report = C.convert_fine_state_dict(original, model_state=model_state)
    assert report.shape_mismatches == [
        ("rpn.head.cls_logits.weight", "head.cls_logits.weight", (5, 64, 1, 1), (12, 64, 1, 1)),
        ("rpn.head.cls_logits.bias", "head.cls_logits.bias", (5,), (12,)),
    ]
    assert "head.cls_logits.weight" not in converted
    assert report.missing_in_checkpoint == ["head.cls_logits.bias", "head.cls_logits.weight"]
    assert "shape mismatch rpn.head.cls_logits.weight" in report.summary()
    assert report.counts()["shape_mismatches"] == 2

    model = fresh.fine()
    before = model.head.cls_logits.weight.detach().clone()
    incompatible = load_file(model, _save(tmp_path, converted))
    assert sorted(incompatible.missing_keys) == report.missing_in_checkpoint
    assert incompatible.unexpected_keys == []
    assert torch.equal(model.head.cls_logits.weight, before)  # kept its initialisation
    _assert_values(model, expected, [k for k in model_state if "cls_logits" not in k])

    # without the model there is nothing to compare with: the tensor is written as it is
    unchecked, report = C.convert_fine_state_dict(original)
    assert unchecked["head.cls_logits.weight"].shape == (5, 64, 1, 1)
    assert report.shape_mismatches == []


def test_module_prefix_only_when_every_key_has_it(fine_model, originals):
    model_state = fine_model.state_dict()
    original, _, _ = originals.make_fine(model_state, prefix="module.")
    _, report = C.convert_fine_state_dict(original)
    assert report.stripped_module_prefix
    assert all(not o.startswith("module.") for o, _ in report.mapped)

    original["rpn.head.extra_without_prefix"] = torch.zeros(1)
    converted, report = C.convert_fine_state_dict(original)
    assert not report.stripped_module_prefix
    reasons = report.skipped_by_reason()
    prefixed = [k for k in original if k.startswith("module.")]
    assert sorted(reasons[C.PARTIAL_MODULE_PREFIX]) == sorted(prefixed)
    assert list(converted) == ["head.extra_without_prefix"]
    assert any("module." in n for n in report.notes)


def test_ema_selection(fine_model, originals):
    model_state = fine_model.state_dict()
    raw, expected_raw, _ = originals.make_fine(model_state, seed=3)
    ema, expected_ema, _ = originals.make_fine(model_state, seed=4)
    container = {"model": raw, "model_ema": ema, "iteration": 5}
    key = "backbone.bottom_up.image_tower.layers.2.blocks.3.attn.qkv_i2t.weight"

    converted, report = C.convert_fine_state_dict(container)
    assert report.source == "model" and torch.equal(converted[key], expected_raw[key])
    converted, report = C.convert_fine_state_dict(container, use_ema=True)
    assert report.source == "model_ema" and torch.equal(converted[key], expected_ema[key])
    assert not torch.equal(expected_raw[key], expected_ema[key])

    nested = {"model_ema": {"state_dict": ema}}
    _, report = C.convert_fine_state_dict(nested, use_ema=True)
    assert report.source == "model_ema/state_dict" and len(report.mapped) == len(model_state)
    with pytest.raises(KeyError, match="model_ema"):
        C.convert_fine_state_dict({"model": raw}, use_ema=True)


def test_non_tensor_entries_are_skipped_and_counted(fine_model, originals):
    model_state = fine_model.state_dict()
    original, _, extras = originals.make_fine(model_state)
    original["iteration"] = 7
    original["__author__"] = "someone"
    original["module.rpn.head.note"] = [1, 2]
    converted, report = C.convert_fine_state_dict(original)
    reasons = report.skipped_by_reason()
    assert sorted(reasons[C.NOT_A_TENSOR]) == ["__author__", "iteration", "module.rpn.head.note"]
    # non-tensor keys do not block the prefix strip decision
    assert report.stripped_module_prefix and len(converted) == len(model_state)
    assert report.counts()["skipped"] == 3 + len(extras)
    with pytest.raises(TypeError, match="checkpoint dict"):
        C.convert_fine_state_dict([1, 2])


def test_unknown_keys_and_missing_keys(fine_model, originals):
    model_state = fine_model.state_dict()
    original, _, _ = originals.make_fine(model_state, prefix="")
    original["roi_heads.box_predictor.weight"] = torch.zeros(2)
    dropped = "fusion_backbone.backbone.fpn.top_blocks.p7.weight"
    del original[dropped]
    converted, report = C.convert_fine_state_dict(original, model_state=model_state)
    assert report.skipped_by_reason()[C.UNRECOGNISED] == ["roi_heads.box_predictor.weight"]
    assert report.missing_in_checkpoint == ["backbone.top_block.p7.weight"]
    assert "1 model tensors not in the checkpoint" in report.summary()


def test_two_keys_onto_one_target_is_an_error():
    # the fine per-output norm3 and the coarse final norm both land in image_tower.norm3
    original = {
        "fusion_backbone.backbone.body.norm3.weight": torch.zeros(4),
        "vit_model.norm.weight": torch.ones(4),
    }
    with pytest.raises(
        ValueError, match="both map to 'backbone.bottom_up.image_tower.norm3.weight'"
    ):
        C.convert_fine_state_dict(original)


# ------------------------------------------------------------------------------ coarse-grained layout
def test_coarse_layout_into_fiber_coarse(coarse_model, fresh, originals, load_file, tmp_path):
    model_state = coarse_model.state_dict()
    original, expected, kinds = originals.make_coarse(model_state, seed=5)
    lightning = {"state_dict": original, "epoch": 3, "global_step": 100,
                 "hyper_parameters": {"image_size": 128}}  # fmt: skip
    converted, report = C.convert_coarse_state_dict(
        lightning, target="coarse", model_state=model_state
    )

    queues = sorted(k for k in model_state if k.startswith("queue."))
    # the feature queue and the ITM input queue (uint8 images here, float32 in the original): the
    # original's queues are dropped and the model keeps its fresh ones
    assert queues == [
        "queue.image_input_queue",
        "queue.image_queue",
        "queue.queue_ptr",
        "queue.queue_total",
        "queue.text_input_mask_queue",
        "queue.text_input_queue",
        "queue.text_queue",
    ]
    assert sorted(converted) == sorted(set(model_state) - set(queues))
    assert report.missing_in_checkpoint == queues and report.shape_mismatches == []
    assert report.source == "state_dict" and not report.stripped_module_prefix

    reason_of = {
        "buffer": C.RECOMPUTED_BUFFER,
        "unused": C.UNUSED_IN_ORIGINAL,
        "queue": C.ITC_QUEUE,
        "task": C.TASK_HEAD,
        "alias": C.RANK_OUTPUT_ALIAS,
    }
    assert dict(report.skipped) == {k: reason_of[kind] for k, kind in kinds.items()}
    counts = Counter(kinds.values())
    assert counts["queue"] == 7 and counts["alias"] == 2 and counts["task"] == 3
    assert any("VQA" in n for n in report.notes)
    assert not any("rank_output" in n for n in report.notes)  # it is an exact copy here

    model = fresh.coarse()
    queue_before = model.queue.image_queue.clone()
    incompatible = load_file(model, _save(tmp_path, converted))
    assert sorted(incompatible.missing_keys) == queues
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    _assert_values(model, expected, [k for k in model_state if k not in queues])
    assert torch.equal(model.queue.image_queue, queue_before)  # re-initialised, not loaded
    assert torch.equal(model.image_norm.weight, original["vit_model.norm.weight"])
    assert torch.equal(model.temp, original["temp"])


def test_coarse_rank_output_divergence_is_noted(coarse_model, originals):
    original, _, _ = originals.make_coarse(coarse_model.state_dict())
    original["rank_output.weight"] = original["rank_output.weight"] + 1
    _, report = C.convert_coarse_state_dict(original)
    assert any("rank_output.weight differs" in n for n in report.notes)
    with pytest.raises(ValueError, match="target"):
        C.convert_coarse_state_dict(original, target="detector")


def test_coarse_layout_into_the_detector_backbone(
    coarse_model, fine_model, fresh, originals, load_file, tmp_path
):
    coarse_state, fine_state = coarse_model.state_dict(), fine_model.state_dict()
    original, _, _ = originals.make_coarse(coarse_state, seed=6)
    converted, report = C.convert_coarse_state_dict(original, target="fine", model_state=fine_state)

    # independent expectation: every coarse tower tensor lands under backbone.bottom_up., except the
    # image-side query norms, which the v2 detector does not have
    expected = {}
    for k in coarse_state:
        orig = originals.coarse_key(k)
        if k.startswith("backbone.") and "norm_i2t_i" not in k:
            expected["backbone.bottom_up." + k[len("backbone.") :]] = original[orig]
    expected["backbone.bottom_up.image_tower.norm3.weight"] = original["vit_model.norm.weight"]
    expected["backbone.bottom_up.image_tower.norm3.bias"] = original["vit_model.norm.bias"]
    assert sorted(converted) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(converted[k], v), k

    reasons = report.skipped_by_reason()
    assert sorted(reasons[C.NOT_IN_MODEL]) == sorted(
        originals.coarse_key(k) for k in coarse_state if "norm_i2t_i" in k
    )
    heads = sorted(
        originals.coarse_key(k)
        for k in coarse_state
        if not k.startswith(("backbone.", "image_norm.", "queue."))
    )
    assert sorted(reasons[C.COARSE_ONLY]) == heads and "temp" in heads

    expected_missing = sorted(set(fine_state) - set(expected))
    assert report.missing_in_checkpoint == expected_missing
    assert all(
        k.startswith(("head.", "backbone.fpn", "backbone.top_block"))
        or ".image_tower.norm1." in k
        or ".image_tower.norm2." in k
        for k in expected_missing
    )
    model = fresh.fine()
    incompatible = load_file(model, _save(tmp_path, converted))
    assert sorted(incompatible.missing_keys) == expected_missing
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    _assert_values(model, expected, expected)


def test_relative_position_tables_are_resized_to_the_model_window(coarse_model, originals):
    model_state = coarse_model.state_dict()
    # a checkpoint trained at another resolution: window 3 (5x5 offsets) vs the model's window 4
    original, _, _ = originals.make_coarse(model_state, seed=7, table_window=3)
    key = "vit_model.layers.2.blocks.1.attn.relative_position_bias_table"
    new = "backbone.image_tower.layers.2.blocks.1.attn.relative_position_bias_table"
    original[key] = torch.randn(25, 4, dtype=torch.float64)

    unchecked, report = C.convert_coarse_state_dict(original)
    assert unchecked[new].shape == (25, 4) and report.resized == []

    converted, report = C.convert_coarse_state_dict(original, model_state=model_state)
    tables = [k for k in model_state if k.endswith("relative_position_bias_table")]
    assert sorted(k for k, _, _ in report.resized) == sorted(tables)
    assert report.shape_mismatches == []
    table = converted[new]
    assert table.shape == (49, 4) and table.dtype == torch.float64
    # reference: timm's own flat-table resize (bicubic, align_corners=False)
    reference = resize_rel_pos_bias_table_simple(original[key], (4, 4), (49, 4))
    torch.testing.assert_close(table, reference, rtol=0, atol=1e-12)
    other = "backbone.image_tower.layers.0.blocks.0.attn.relative_position_bias_table"
    reference = resize_rel_pos_bias_table_simple(
        original[other.replace("backbone.image_tower.", "vit_model.")], (4, 4), (49, 1)
    )
    torch.testing.assert_close(converted[other], reference, rtol=0, atol=1e-6)
    # the zero offset (grid centre) keeps its value exactly; a constant table stays constant
    torch.testing.assert_close(table[24], original[key][12], rtol=0, atol=1e-12)
    flat = C.resize_relative_position_table(torch.full((9, 2), 0.5), 25)
    torch.testing.assert_close(flat, torch.full((25, 2), 0.5))
    with pytest.raises(ValueError, match="not square"):
        C.resize_relative_position_table(torch.zeros(10, 2), 25)


def test_relative_position_table_with_other_heads_is_a_mismatch(coarse_model, originals):
    model_state = coarse_model.state_dict()
    original, _, _ = originals.make_coarse(model_state)
    key = "vit_model.layers.0.blocks.0.attn.relative_position_bias_table"
    original[key] = torch.zeros(25, 3)  # the model has 1 head and 49 rows
    converted, report = C.convert_coarse_state_dict(original, model_state=model_state)
    new = "backbone.image_tower.layers.0.blocks.0.attn.relative_position_bias_table"
    assert report.shape_mismatches == [(key, new, (25, 3), (49, 1))]
    assert new not in converted and new in report.missing_in_checkpoint


# ------------------------------------------------------------------------------ full-size key list
def _spec_rows():
    rows = []
    for line in SPEC_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype, kind = line.split("\t")
        dims = tuple(int(x) for x in shape.split("x")) if shape else ()
        rows.append((key, dims, getattr(torch, dtype), kind))
    return rows


def test_fiber_b_released_key_list_converts_completely(originals):
    rows = _spec_rows()
    assert len(rows) == 806
    cfg = load_config(str(ROOT / "configs/FIBER-B/coco.yaml"), ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        model = build_model(cfg)
    model_state = model.state_dict()
    original = {
        "module." + k: torch.empty(shape, dtype=dtype, device="meta") for k, shape, dtype, _ in rows
    }
    converted, report = C.convert_fine_state_dict({"model": original})

    shapes = {k: shape for k, shape, _, _ in rows}
    for orig, new in report.mapped:
        assert new in model_state, (orig, new)
        assert tuple(model_state[new].shape) == shapes[orig], (orig, new)
    assert sorted(converted) == sorted(model_state)  # every model tensor is covered
    buffers = sorted(k for k, _, _, kind in rows if kind == "buffer")
    assert len(buffers) == 30
    assert sorted(k for k, _ in report.skipped) == buffers
    assert {r for _, r in report.skipped} == {C.RECOMPUTED_BUFFER}
    # the independent inverse of the test reaches every original key that the model has
    assert {originals.fine_key(k) for k in model_state} == set(shapes) - set(buffers)
    params = sum(int(torch.tensor(s).prod()) for k, s, _, kind in rows if kind == "param")
    assert params == sum(v.numel() for v in model_state.values()) == 252_055_304

    _, checked = C.convert_fine_state_dict({"model": original}, model_state=model_state)
    assert checked.missing_in_checkpoint == [] and checked.shape_mismatches == []
    assert len(checked.mapped) == 776


# ------------------------------------------------------------------------------ caption layout
def test_caption_layout_keeps_the_adapters_and_maps_the_rest_as_coarse(coarse_model, originals):
    model_state = coarse_model.state_dict()
    original, _, _ = originals.make_coarse(model_state, seed=4)
    adapters = {f"cross_modal_att_layers.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    for key in sorted(adapters):
        original[key] = torch.randn((128, 256) if key.endswith("weight") else (128,))
    caption, report = C.convert_caption_state_dict({"state_dict": original})
    coarse, _ = C.convert_coarse_state_dict({"state_dict": original}, target="coarse")
    assert set(caption) == set(coarse) | adapters
    for key in adapters:
        assert torch.equal(caption[key], original[key])
    for key in coarse:
        assert torch.equal(caption[key], coarse[key])
    assert C.TASK_HEAD in {r for _, r in report.skipped}  # VQA / NLVR2 heads are still dropped
    assert not any(k.startswith("cross_modal_att_layers.") for k, _ in report.skipped)


def test_half_precision_tables_are_resized_in_float32():
    """A float16 table (a checkpoint saved in half precision) is resized in float32 and cast back
    once: the same values as resizing its float32 copy."""
    table = torch.randn(25, 3, generator=torch.Generator().manual_seed(0)).half()
    resized = C.resize_relative_position_table(table, 49)
    assert resized.dtype == torch.float16
    expected = C.resize_relative_position_table(table.float(), 49).half()
    torch.testing.assert_close(resized, expected, rtol=0, atol=0)
