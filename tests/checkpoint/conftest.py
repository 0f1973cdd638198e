"""Fixtures shared by the checkpoint-conversion tests: tiny fiber_d2 models and synthetic originals.

The original layouts are produced from a fiber_d2 model's state dict by an inverse mapping written here
from the spec tables (fine spec §7.2, coarse spec §6.2), independently of
``fiber_d2.modeling.backbone.naming``, plus the extra tensors the originals carry (buffers, unused
modules, queues, task heads). Every tensor gets its own random values.
"""

import copy
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model

import fiber_d2  # noqa: F401
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
FINE_CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
COARSE_CFG = str(ROOT / "configs/Demo/coarse_tiny.yaml")
# converted weights run with the original's ITC (the defaults), not the Demo's from-scratch switches
ORIGINAL_ITC = ["MODEL.COARSE.ITC_TEXT_POOL", "first", "MODEL.COARSE.QUEUE_INIT", "random"]
ORIGINAL_ITC += ["MODEL.COARSE.ITC_BATCH_NORM", "False"]


def tiny_cfg(path, *opts):
    cfg = load_config(path, ["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture(scope="session")
def fine_model():
    """The tiny detector (fine_tiny.yaml). Tests deep-copy it before loading weights."""
    torch.manual_seed(0)
    return build_model(tiny_cfg(FINE_CFG)).eval()


@pytest.fixture(scope="session")
def coarse_model():
    """The tiny FIBERCoarse (coarse_tiny.yaml). Tests deep-copy it before loading weights."""
    torch.manual_seed(0)
    return build_model(tiny_cfg(COARSE_CFG, *ORIGINAL_ITC)).eval()


# -------------------------------------------------------------------------- inverse key tables
def _image_rest(rest):
    """fiber_d2 (timm) image-tower name -> original Swin name: patch merging sits at the start of
    stage s+1 in timm and at the end of stage s in the original."""
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", rest)
    if m:
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    return rest


def fine_original_key(key):
    """fiber_d2 detector key -> original fine-grained key (fine spec §7.2)."""
    if key.startswith("head."):
        return "rpn.head." + key[len("head.") :]
    if key.startswith("backbone.bottom_up.image_tower."):
        rest = key[len("backbone.bottom_up.image_tower.") :]
        return "fusion_backbone.backbone.body." + _image_rest(rest)
    if key.startswith("backbone.bottom_up.text_tower.model."):
        rest = key[len("backbone.bottom_up.text_tower.model.") :]
        return "fusion_backbone.language_backbone.body.model." + rest
    m = re.match(r"backbone\.fpn_(lateral|output)(\d)\.(.*)$", key)
    if m:  # d2 fpn_lateral3/4/5 <-> fpn_inner2/3/4, fpn_output3/4/5 <-> fpn_layer2/3/4
        kind = "inner" if m.group(1) == "lateral" else "layer"
        return f"fusion_backbone.backbone.fpn.fpn_{kind}{int(m.group(2)) - 1}.{m.group(3)}"
    if key.startswith("backbone.top_block."):
        return "fusion_backbone.backbone.fpn.top_blocks." + key[len("backbone.top_block.") :]
    raise KeyError(key)


def coarse_original_key(key):
    """FIBERCoarse key -> original coarse key (coarse spec §6.2)."""
    if key.startswith("backbone.image_tower."):
        return "vit_model." + _image_rest(key[len("backbone.image_tower.") :])
    if key.startswith("image_norm."):
        return "vit_model.norm." + key[len("image_norm.") :]
    if key.startswith("backbone.text_tower.model."):
        return "text_transformer." + key[len("backbone.text_tower.model.") :]
    if key.startswith("queue."):
        return key[len("queue.") :]
    return key  # cross_modal_*, itm_score, mlm_score, temp keep their names


def _blocks(state, image_prefix):
    """(stage, block, heads, window) of every Swin block in a fiber_d2 state dict."""
    out = []
    for k, v in state.items():
        m = re.match(
            re.escape(image_prefix)
            + r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$",
            k,
        )
        if m:
            window = (round(v.shape[0] ** 0.5) + 1) // 2
            out.append((int(m.group(1)), int(m.group(2)), v.shape[1], window))
    return out


def _fill(shapes_and_dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, dtype) in shapes_and_dtypes.items():
        if dtype.is_floating_point:
            out[k] = torch.randn(shape, generator=g).to(dtype)
        else:
            out[k] = torch.randint(0, 1000, shape, generator=g).to(dtype)
    return out


def make_fine_original(model_state, seed=0, prefix="module."):
    """(original state dict, expected fiber_d2 values, extra original keys) for a detector state."""
    spec = {fine_original_key(k): (tuple(v.shape), v.dtype) for k, v in model_state.items()}
    extras = {}
    for s, b, _, w in _blocks(model_state, "backbone.bottom_up.image_tower."):
        key = f"fusion_backbone.backbone.body.layers.{s}.blocks.{b}.attn.relative_position_index"
        extras[key] = ((w * w, w * w), torch.long)
    pos = model_state["backbone.bottom_up.text_tower.model.embeddings.position_embeddings.weight"]
    extras["fusion_backbone.language_backbone.body.model.embeddings.position_ids"] = (
        (1, pos.shape[0]),
        torch.long,
    )
    for level in range(5):
        extras[f"rpn.anchor_generator.cell_anchors.{level}"] = ((1, 4), torch.float32)
    values = _fill({**spec, **extras}, seed)
    expected = {k: values[fine_original_key(k)] for k in model_state}
    original = {prefix + k: v for k, v in values.items()}
    return original, expected, sorted(extras)


def make_coarse_original(model_state, seed=0, table_window=None, text_len=8, image_size=16):
    """(original Lightning state dict, expected FIBERCoarse values, {original key: skip kind}).

    ``table_window`` writes relative-position tables of another window (as a checkpoint trained at
    another resolution would have).
    """
    spec = {coarse_original_key(k): (tuple(v.shape), v.dtype) for k, v in model_state.items()}
    extras = {}  # original key -> kind of drop
    for s, b, heads, w in _blocks(model_state, "backbone.image_tower."):
        p = f"vit_model.layers.{s}.blocks.{b}.attn."
        if table_window is not None:
            spec[p + "relative_position_bias_table"] = (
                (2 * table_window - 1) ** 2,
                heads,
            ), torch.float32
        extras[p + "relative_position_index"] = ("buffer", (w * w, w * w), torch.long)
        if b % 2 == 1 and s < 3:  # shifted blocks of stages 0..2 carry attn_mask
            extras[f"vit_model.layers.{s}.blocks.{b}.attn_mask"] = (
                "buffer",
                (4, w * w, w * w),
                torch.float32,
            )
    text = "backbone.text_tower.model."
    dim = model_state[text + "embeddings.word_embeddings.weight"].shape[1]
    positions = model_state[text + "embeddings.position_embeddings.weight"].shape[0]
    extras["text_transformer.embeddings.position_ids"] = ("buffer", (1, positions), torch.long)
    extras["text_transformer.pooler.dense.weight"] = ("unused", (dim, dim), torch.float32)
    extras["text_transformer.pooler.dense.bias"] = ("unused", (dim,), torch.float32)
    layers = sorted(
        {
            int(m.group(1))
            for k in model_state
            if (m := re.match(re.escape(text) + r"encoder\.layer\.(\d+)\.", k))
        }
    )
    for j in layers:
        base = f"text_transformer.encoder.layer.{j}."
        if f"{text}encoder.layer.{j}.crossattention_t2i.self.query.weight" in model_state:
            extras[base + "crossattention_t2i.output.LayerNorm.weight"] = (
                "unused",
                (dim,),
                torch.float32,
            )
            extras[base + "crossattention_t2i.output.LayerNorm.bias"] = (
                "unused",
                (dim,),
                torch.float32,
            )
        else:  # the coarse text model has alpha_t2i in every layer
            extras[base + "alpha_t2i"] = ("unused", (1,), torch.float32)
    queue = model_state["queue.image_queue"].shape[1]
    extras["image_input_queue"] = ("queue", (queue, 3, image_size, image_size), torch.float32)
    extras["text_input_queue"] = ("queue", (queue, text_len), torch.long)
    extras["text_input_mask_queue"] = ("queue", (queue, text_len), torch.long)
    extras["vqa_classifier.0.weight"] = ("task", (4 * dim, 2 * dim), torch.float32)
    extras["vqa_classifier.3.bias"] = ("task", (7,), torch.float32)
    extras["nlvr2_classifier.0.weight"] = ("task", (2 * dim, 4 * dim), torch.float32)
    values = _fill({**spec, **{k: v[1:] for k, v in extras.items()}}, seed)
    # rank_output is a copy of itm_score.fc row 1 (coarse spec §6.2)
    values["rank_output.weight"] = values["itm_score.fc.weight"][1:2].clone()
    values["rank_output.bias"] = values["itm_score.fc.bias"][1:2].clone()
    kinds = {k: v[0] for k, v in extras.items()}
    kinds.update({"rank_output.weight": "alias", "rank_output.bias": "alias"})
    kinds.update({k: "queue" for k in ("image_queue", "text_queue", "queue_ptr", "queue_total")})
    expected = {k: values[coarse_original_key(k)] for k in model_state}
    return values, expected, kinds


@pytest.fixture()
def originals():
    """The generators above, for the tests."""
    return SimpleNamespace(
        fine_key=fine_original_key,
        coarse_key=coarse_original_key,
        make_fine=make_fine_original,
        make_coarse=make_coarse_original,
    )


@pytest.fixture()
def fresh(fine_model, coarse_model):
    """Deep copies of the tiny models, so loading weights does not leak between tests."""
    return SimpleNamespace(
        fine=lambda: copy.deepcopy(fine_model), coarse=lambda: copy.deepcopy(coarse_model)
    )


def load_with_checkpointer(model, path):
    """Load ``path`` into ``model`` with FIBERCheckpointer; returns the incompatible-keys record."""
    from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer

    checkpointer = FIBERCheckpointer(model)
    seen = []
    checkpointer._log_incompatible_keys = seen.append
    checkpointer.load(str(path))
    assert len(seen) == 1
    return seen[0]


@pytest.fixture()
def load_file():
    """``load_file(model, path)`` -> incompatible keys (missing_keys, unexpected_keys, incorrect_shapes)."""
    return load_with_checkpointer
