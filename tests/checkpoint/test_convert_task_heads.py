"""The released ``fiber_vqa.ckpt`` / ``fiber_nlvr2.ckpt`` layouts (coarse spec §6.2), built at tiny size
in the original key layout, convert and load into projects/VQA's ``FIBERVQA`` and projects/NLVR2's
``FIBERNLVR2`` with no missing or unexpected keys and every value in place; a coarse checkpoint of
another window loads into a task model with its relative-position tables resized (coarse spec §5.1).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from fiber_d2.checkpoint import convert as C
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "checkpoint_conftest", Path(__file__).with_name("conftest.py")
)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
_blocks, _fill = _conftest._blocks, _conftest._fill
coarse_original_key, load_with_checkpointer = (
    _conftest.coarse_original_key,
    _conftest.load_with_checkpointer,
)
for _p in ("VQA", "NLVR2"):
    if str(ROOT / "projects" / _p) not in sys.path:
        sys.path.insert(0, str(ROOT / "projects" / _p))

import nlvr2  # noqa: E402,F401  (registers FIBERNLVR2)
import vqa  # noqa: E402  (registers FIBERVQA)

TINY = ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2"]
# the original task models (the shapes configs switch on the Demo's batch-standardised cls_feats, which
# the released layouts do not have; tests/modeling/test_cls_batch_norm.py covers loading with it)
TINY += ["MODEL.COARSE.CLS_BATCH_NORM", "False"]


def _task_model(project, *opts):
    if project == "VQA":
        cfg = load_config(
            str(ROOT / "projects/VQA/configs/shapes.yaml"),
            [*TINY, "VQA.ANSWER_VOCAB", str(_vocab_file()), *opts],
            extra_defaults=(vqa.add_vqa_config,),
        )
    else:
        cfg = load_config(str(ROOT / "projects/NLVR2/configs/shapes.yaml"), [*TINY, *opts])
    torch.manual_seed(0)
    return build_model(cfg).eval()


_VOCAB: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _vocab(tmp_path_factory):
    """The tiny VQA answer vocabulary, in pytest's temporary folder (cleaned up by pytest)."""
    path = tmp_path_factory.mktemp("vocab") / "answers.json"
    path.write_text(json.dumps(["yes", "no", "2", "red", "circle", "0", "blue"]))
    _VOCAB[:] = [path]
    yield
    _VOCAB.clear()


def _vocab_file() -> Path:
    return _VOCAB[0]


def _released_layout(model_state, seed):
    """(original state dict, {original key: fiber_d2 key}) of a released task checkpoint: the model's
    tensors under their original names plus the buffers / unused tensors the original carries."""
    names = {coarse_original_key(k): k for k in model_state}
    spec = {o: (tuple(model_state[k].shape), model_state[k].dtype) for o, k in names.items()}
    for s, b, _, w in _blocks(model_state, "backbone.image_tower."):
        spec[f"vit_model.layers.{s}.blocks.{b}.attn.relative_position_index"] = (
            (w * w, w * w),
            torch.long,
        )
    text = "backbone.text_tower.model."
    positions = model_state[text + "embeddings.position_embeddings.weight"].shape[0]
    dim = model_state[text + "embeddings.word_embeddings.weight"].shape[1]
    spec["text_transformer.embeddings.position_ids"] = ((1, positions), torch.long)
    spec["text_transformer.pooler.dense.weight"] = ((dim, dim), torch.float32)
    return _fill(spec, seed), names


@pytest.mark.parametrize(
    "project, head", [("VQA", "vqa_classifier"), ("NLVR2", "nlvr2_classifier")]
)
def test_released_task_layout_converts_and_loads_completely(project, head, tmp_path):
    model = _task_model(project)
    state = model.state_dict()
    original, names = _released_layout(state, seed=3)
    head_keys = sorted(k for k in state if k.startswith(head + "."))
    # the original's head layout: Linear (index 0), LayerNorm (1), GELU (2, no tensors), Linear (3)
    assert head_keys == [f"{head}.{i}.{p}" for i in (0, 1, 3) for p in ("bias", "weight")]
    width = state["cross_modal_text_transform.weight"].shape[0] * 2
    in_dim = width if project == "VQA" else 2 * width
    assert state[f"{head}.0.weight"].shape == (width, in_dim)
    assert state[f"{head}.3.weight"].shape[0] == (7 if project == "VQA" else 2)
    assert not any(k.startswith(("itm_score", "mlm_score", "queue", "temp")) for k in state)

    converted, report = C.convert_coarse_state_dict(
        {"state_dict": original}, target="coarse", model_state=state
    )
    assert sorted(converted) == sorted(state)
    assert report.missing_in_checkpoint == [] and report.shape_mismatches == []
    assert not any(reason == C.TASK_HEAD for _, reason in report.skipped)
    path = tmp_path / "converted.pth"
    torch.save({"model": converted}, path)
    fresh = _task_model(project)
    incompatible = load_with_checkpointer(fresh, path)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    loaded = fresh.state_dict()
    for original_key, key in names.items():
        assert torch.equal(loaded[key], original[original_key]), key


def test_task_heads_are_dropped_for_a_model_without_them():
    model = _task_model("VQA")
    original, _ = _released_layout(model.state_dict(), seed=1)
    _, report = C.convert_coarse_state_dict(original, target="coarse")
    dropped = sorted(k for k, reason in report.skipped if reason == C.TASK_HEAD)
    assert dropped and all(k.startswith("vqa_classifier.") for k in dropped)


def test_coarse_checkpoint_of_another_window_loads_with_resized_tables(tmp_path):
    """A coarse (pre-training) checkpoint at window 4 fine-tuned at window 2 (coarse spec §5.1)."""
    coarse = load_config(str(ROOT / "configs/Demo/coarse_tiny.yaml"), TINY)
    torch.manual_seed(1)
    source = build_model(coarse).state_dict()
    path = tmp_path / "coarse.pth"
    torch.save({"model": source}, path)
    model = _task_model("NLVR2", "MODEL.SWIN.WINDOW_SIZE", "2", "INPUT.IMAGE_SIZE", "64")
    incompatible = load_with_checkpointer(model, path)
    assert incompatible.incorrect_shapes == []
    assert all(k.startswith("nlvr2_classifier.") for k in incompatible.missing_keys)
    assert incompatible.missing_keys
    assert all(
        k.startswith(("itm_score", "mlm_score", "queue", "temp"))
        for k in incompatible.unexpected_keys
    )
    key = "backbone.image_tower.layers.0.blocks.0.attn.relative_position_bias_table"
    table = model.state_dict()[key]
    assert source[key].shape[0] == 49 and table.shape[0] == 9  # (2w-1)^2: 7x7 -> 3x3
    assert torch.allclose(table, C.resize_relative_position_table(source[key], 9))
    assert not torch.allclose(table, source[key][:9])


def test_tool_converts_a_released_vqa_checkpoint_with_project_config(tmp_path, capsys):
    from tool_scripts import load_tool

    tool = load_tool("convert_fiber_checkpoint")
    state = _task_model("VQA").state_dict()
    original, names = _released_layout(state, seed=7)
    src, out = tmp_path / "fiber_vqa.ckpt", tmp_path / "vqa_d2.pth"
    torch.save({"state_dict": original, "epoch": 9}, src)
    opts = [*TINY, "VQA.ANSWER_VOCAB", str(_vocab_file())]
    config = str(ROOT / "projects/VQA/configs/shapes.yaml")
    tool.main(["--input", str(src), "--output", str(out), "--project", "VQA",
               "--config-file", config, *opts])  # fmt: skip
    saved = torch.load(out, weights_only=True)
    assert saved["__fiber_d2__"]["target"] == "coarse"
    assert saved["__fiber_d2__"]["missing_in_checkpoint"] == []
    assert torch.equal(
        saved["model"]["vqa_classifier.3.weight"], original["vqa_classifier.3.weight"]
    )
    with pytest.raises(SystemExit, match="config key: VQA"):  # the project adds its keys
        tool.main(["--input", str(src), "--output", str(out), "--config-file", config, *opts])


def _retrieval_model(config, *opts):
    if str(ROOT / "projects" / "Retrieval") not in sys.path:
        sys.path.insert(0, str(ROOT / "projects" / "Retrieval"))
    import retrieval

    cfg = load_config(
        str(ROOT / "projects/Retrieval/configs" / config),
        [*TINY, "MODEL.COARSE.ITC_BATCH_NORM", "False", *opts],
        extra_defaults=(retrieval.add_retrieval_config,),
    )
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.mark.parametrize(
    "config, absent",
    [
        ("shapes_itc.yaml", ("itm_score.", "mlm_score.")),
        ("shapes_itm.yaml", ("mlm_score.", "temp")),
    ],
)
def test_released_retrieval_layouts_without_the_heads_their_losses_never_read_load(
    config, absent, tmp_path
):
    """The original builds mlm_score / itm_score / temp only for its losses, so the released ITC
    and ITM retrieval checkpoints lack the others; they were refused as partial loads (8 of 249
    tensors missing at this size, about 14 % of the weights at FIBER-B size)."""
    from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
    from fiber_d2.checkpoint.safe_io import CheckpointError

    model = _retrieval_model(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(absent)}
    original, names = _released_layout(state, seed=4)
    converted, report = C.convert_coarse_state_dict(
        {"state_dict": original}, target="coarse", model_state=model.state_dict()
    )
    path = tmp_path / "released.pth"
    torch.save({"model": converted}, path)
    for inference in (True, False):
        fresh = _retrieval_model(config)
        FIBERCheckpointer(fresh, inference=inference).load(str(path))
        loaded = dict(fresh.named_parameters())
        for original_key, key in names.items():
            if key in loaded:  # the parameters (the converter drops the queues)
                assert torch.equal(loaded[key], original[original_key]), key
    # the same file into a model whose losses read the head: refused, naming it
    mlm = ["MODEL.COARSE.LOSSES", '["itc", "itm", "mlm"]', "MODEL.COARSE.LOSS_WEIGHTS", "[1, 1, 1]"]
    with pytest.raises(CheckpointError, match="mlm_score"):
        FIBERCheckpointer(_retrieval_model("shapes_itc.yaml", *mlm), inference=True).load(str(path))


def test_an_itm_model_is_not_evaluated_without_its_itm_head(tmp_path):
    """ITM retrieval scores pairs with itm_score, a small share of the weights (2 x 2D + 2): a file
    without it loaded within the 1 % tolerance and re-ranked with a random head."""
    from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
    from fiber_d2.checkpoint.safe_io import CheckpointError

    state = _retrieval_model("shapes_itm.yaml").state_dict()
    path = tmp_path / "no_itm.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("itm_score.")}}, path)
    FIBERCheckpointer(_retrieval_model("shapes_itm.yaml")).load(str(path))  # to train: its init
    with pytest.raises(CheckpointError, match="The checkpoint has no itm_score head"):
        FIBERCheckpointer(_retrieval_model("shapes_itm.yaml"), inference=True).load(str(path))
