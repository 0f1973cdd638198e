"""fiber_d2.model_zoo: the table, configs, file lookup, loading of both layouts, bad files.

The original-layout weights are the parity fixture's (``../shared/fixtures/original_fine_tiny``, a tiny
FIBER in the released key layout); FIBER_D2_HOME points at a temporary folder; nothing is downloaded.
"""

import logging
import re
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from fiber_d2 import FIBERPredictor, model_zoo
from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.checkpoint.convert import convert_fine_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT.parent / "shared" / "fixtures" / "original_fine_tiny"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FIBER_D2_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_every_entry_has_a_loadable_config_and_a_tokenizer():
    assert len(model_zoo.ENTRIES) == len(set(model_zoo.names()))
    for e in model_zoo.ENTRIES:
        assert e.stage in ("fine", "coarse") and e.tokenizer and e.task
        cfg = model_zoo.get_config(e.name)
        coarse = ("FIBERCoarse", "FIBERRetrievalITM", "FIBERVQA", "FIBERNLVR2", "FIBERCaption")
        archs = ("FIBER",) if e.stage == "fine" else coarse
        assert cfg.MODEL.META_ARCHITECTURE in archs, e.name
        # the task checkpoints load into their project's model (not only its backbone)
        task = {"fiber_vqa.ckpt": "FIBERVQA", "fiber_nlvr2.ckpt": "FIBERNLVR2"}
        task["fiber_coco_caption.ckpt"] = "FIBERCaption"
        assert cfg.MODEL.META_ARCHITECTURE == task.get(e.file_name, cfg.MODEL.META_ARCHITECTURE)
        assert cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER == e.tokenizer, e.name
        assert e.released == bool(e.file_name)
        assert e.url or e.how_to_get, e.name
    released = {e.file_name for e in model_zoo.ENTRIES if e.stage == "coarse"}
    assert "fiber_pretrain.ckpt" in released and "fiber_vqa.ckpt" in released
    assert model_zoo.entry("fiber-b/coco").reported == {"COCO AP": "58.4"}


def test_readme_model_zoo_table_is_generated_from_the_catalog():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- model-zoo:begin -->\n(.*?)\n<!-- model-zoo:end -->", readme, re.S)
    assert match, "README lacks the generated model-zoo table markers"
    assert match.group(1).strip() == model_zoo.markdown_table().strip()


def test_update_readme_rewrites_only_the_generated_block(tmp_path, caplog):
    """``python -m fiber_d2.model_zoo``: the table on stdout; ``--update-readme`` replaces the block
    between the markers (stale or empty) and keeps the rest; a file without it is one line."""
    from fiber_d2.model_zoo.__main__ import main

    table = model_zoo.markdown_table()
    with caplog.at_level(logging.INFO, logger="fiber_d2.model_zoo"):
        main([])
    assert [r.getMessage() for r in caplog.records] == [table]
    for block in ("| stale | row |\n", ""):
        readme = tmp_path / "README.md"
        readme.write_text(f"intro\n<!-- model-zoo:begin -->\n{block}<!-- model-zoo:end -->\nrest\n")
        main(["--update-readme", str(readme)])
        expected = f"intro\n<!-- model-zoo:begin -->\n{table}\n<!-- model-zoo:end -->\nrest\n"
        assert readme.read_text() == expected
    bare = tmp_path / "bare.md"
    bare.write_text("no block here\n")
    with pytest.raises(SystemExit, match="bare.md has no '<!-- model-zoo:begin -->'"):
        main(["--update-readme", str(bare)])
    assert bare.read_text() == "no block here\n"


def test_update_readme_that_fails_while_writing_keeps_the_readme(tmp_path, monkeypatch):
    """The README is rewritten whole or not at all: a write that fails part-way (here a table the
    encoding cannot hold) leaves it as it was, not truncated."""
    from fiber_d2.model_zoo import __main__ as cli

    text = "intro\n<!-- model-zoo:begin -->\n<!-- model-zoo:end -->\nrest\n"
    readme = tmp_path / "README.md"
    readme.write_text(text)
    monkeypatch.setattr(cli, "markdown_table", lambda: "| bad \udc80 |")
    with pytest.raises(UnicodeEncodeError):
        cli.main(["--update-readme", str(readme)])
    assert readme.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_unknown_name_lists_the_known_names():
    with pytest.raises(KeyError, match="known names: demo, fiber-b/fine-pretrain"):
        model_zoo.get_config("fiber-b/cocoo")
    with pytest.raises(KeyError, match="fiber-b/coco"):
        FIBERPredictor.from_pretrained("fiber-l/coco")


def test_missing_file_says_what_to_fetch_and_where(home):
    with pytest.raises(FileNotFoundError) as err:
        model_zoo.get_weights_path("fiber-b/coco")
    message = str(err.value)
    assert "\n" not in message
    assert "model_0072500.pth" in message and "https://" in message
    assert str(home / "fiber-b_coco" / "model_0072500.pth") in message
    with pytest.raises(FileNotFoundError, match="not released"):
        model_zoo.get_weights_path("fiber-b/refcocog")
    with pytest.raises(ValueError, match="coarse-grained"):
        FIBERPredictor.from_pretrained("fiber-b/vqa")


def test_demo_weights_under_fiber_d2_home_load(home):
    cfg = model_zoo.get_config("demo")
    torch.manual_seed(3)
    model = build_model(cfg)
    (home / "demo").mkdir(parents=True)
    FIBERCheckpointer(model, save_dir=str(home / "demo")).save("model_final")
    assert model_zoo.get_weights_path("demo") == home / "demo" / "model_final.pth"
    loaded = model_zoo.get("demo", device="cpu")
    assert not loaded.training
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())


def test_fiber_d2_home_comes_before_a_local_copy(home, tmp_path, monkeypatch):
    from fiber_d2.model_zoo import weights

    e = model_zoo.entry("demo")
    checkout = tmp_path / "checkout"
    for path in [checkout / e.local_copies[0], home / e.folder / e.file_name]:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"weights")
    monkeypatch.setattr(weights, "source_checkout", lambda: checkout)
    assert model_zoo.get_weights_path("demo") == home / e.folder / e.file_name
    (home / e.folder / e.file_name).unlink()
    assert model_zoo.get_weights_path("demo") == checkout / e.local_copies[0]


def test_a_coarse_stage_file_is_not_loaded_as_the_detector(tmp_path, home):
    """get() returns a model to predict with: a file without the detector head (a coarse-stage
    checkpoint, which training takes as the coarse-to-fine hand-off) is refused."""
    from fiber_d2.checkpoint import CheckpointError
    from fiber_d2.engine.setup import load_config

    torch.manual_seed(0)
    coarse = build_model(load_config(str(ROOT / "configs/Demo/coarse_tiny.yaml")))
    path = tmp_path / "coarse_final.pth"
    torch.save({"model": coarse.state_dict()}, path)
    with pytest.raises(CheckpointError, match="no detector head"):
        model_zoo.get("demo", weights=path, device="cpu")


# ------------------------------------------------------------------ original layout (parity fixture)
needs_fixture = pytest.mark.skipif(
    not (FIX / "state_original.safetensors").exists(), reason=f"fixture not found at {FIX}"
)


def _fixture_yaml(tmp_path) -> str:
    text = (FIX / "overrides.yaml").read_text()
    text = text.replace('TOKENIZER: "tokenizer"', f'TOKENIZER: "{FIX / "tokenizer"}"')
    path = tmp_path / "tiny_fiber_b.yaml"
    path.write_text(f'_BASE_: "{ROOT / "configs/FIBER-B/coco.yaml"}"\n' + text)
    return str(path)


@needs_fixture
def test_original_layout_file_is_converted_cached_and_reused(tmp_path, home, monkeypatch):
    from safetensors.torch import load_file

    original = load_file(str(FIX / "state_original.safetensors"))
    assert model_zoo.checkpoint_layout(original) == "original-fine"
    original = {"module." + k: v for k, v in original.items()}  # saved from DDP, as released
    path = tmp_path / "model_0072500.pth"
    torch.save({"model": original, "iteration": 72500}, path)
    config = _fixture_yaml(tmp_path)

    predictor = FIBERPredictor.from_pretrained(path, config=config, device="cpu")
    expected, _ = convert_fine_state_dict(original, model_state=predictor.model.state_dict())
    got = predictor.model.state_dict()
    assert len(expected) == 776
    assert [k for k, v in expected.items() if not torch.equal(got[k], v)] == []
    cache = tmp_path / "model_0072500.pth.fiber_d2.safetensors"
    assert cache.is_file()
    assert model_zoo.checkpoint_layout(load_file(str(cache))) == "fiber_d2"

    # the second load reads the cache: the converter does not run again
    import fiber_d2.checkpoint.convert as convert

    calls = []
    real = convert.convert_fine_state_dict
    monkeypatch.setattr(
        convert, "convert_fine_state_dict", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = FIBERPredictor.from_pretrained(path, config=config, device="cpu")
    assert calls == []
    assert [k for k, v in expected.items() if not torch.equal(again.model.state_dict()[k], v)] == []
    out = again(torch.zeros(3, 40, 56, dtype=torch.uint8), ["person", "dog"])
    assert out["instances"].image_size == (40, 56)


@needs_fixture
def test_wrong_architecture_and_truncated_files_are_one_line(tmp_path, home):
    from safetensors.torch import load_file

    original = load_file(str(FIX / "state_original.safetensors"))
    path = tmp_path / "fiber_b_tiny.pth"
    torch.save({"model": original}, path)
    with pytest.raises(ValueError) as err:  # the Demo config is another architecture
        FIBERPredictor.from_pretrained(path, config="demo", device="cpu")
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert "does not fit this model" in str(err.value)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        FIBERPredictor.from_pretrained(truncated, config=_fixture_yaml(tmp_path), device="cpu")
    assert "\n" not in str(err.value) and str(truncated) in str(err.value)

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        FIBERPredictor.from_pretrained(tmp_path / "nope.pth")
