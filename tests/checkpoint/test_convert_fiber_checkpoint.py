"""Tests of tools/convert_fiber_checkpoint.py, end to end on temporary files."""

import pickle
from pathlib import Path

import pytest
import torch
from tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]
tool = load_tool("convert_fiber_checkpoint")

FINE_CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
COARSE_CFG = str(ROOT / "configs/Demo/coarse_tiny.yaml")
# converted weights run with the original's ITC (the defaults), not the Demo's from-scratch switches
ORIGINAL_ITC = ["MODEL.COARSE.ITC_TEXT_POOL", "first", "MODEL.COARSE.QUEUE_INIT", "random"]
ORIGINAL_ITC += ["MODEL.COARSE.ITC_BATCH_NORM", "False"]


class _NotATensor:
    pass


def test_fine_checkpoint_end_to_end(fine_model, fresh, originals, load_file, tmp_path, capsys):
    model_state = fine_model.state_dict()
    raw, _, _ = originals.make_fine(model_state, seed=11)
    ema, expected_ema, _ = originals.make_fine(model_state, seed=12)
    src, out = tmp_path / "fiber_fine.pth", tmp_path / "out" / "fiber_d2.pth"
    torch.save({"model": raw, "model_ema": ema, "iteration": 100, "optimizer": {}}, src)

    tool.main(["--input", str(src), "--output", str(out), "--use-ema", "--config-file", FINE_CFG])
    printed = capsys.readouterr().out
    assert f"{len(model_state)} tensors mapped" in printed and "0 shape mismatches" in printed

    saved = torch.load(out, weights_only=True)
    info = saved["__fiber_d2__"]
    assert info["stage"] == "fine" and info["target"] == "fine" and info["entry"] == "model_ema"
    assert info["use_ema"] and info["counts"]["mapped"] == len(model_state)
    assert info["missing_in_checkpoint"] == [] and info["input"] == str(src.resolve())
    model = fresh.fine()
    incompatible = load_file(model, out)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    state = model.state_dict()
    for k in model_state:
        assert torch.equal(state[k], expected_ema[k]), k


def test_coarse_checkpoint_end_to_end(coarse_model, fresh, originals, load_file, tmp_path, capsys):
    model_state = coarse_model.state_dict()
    original, expected, _ = originals.make_coarse(model_state, seed=13)
    src, out = tmp_path / "fiber_pretrain.ckpt", tmp_path / "coarse_d2.pth"
    torch.save({"state_dict": original, "epoch": 9, "hyper_parameters": {"image_size": 128}}, src)

    # layout detected from the keys, target taken from the config (FIBERCoarse)
    tool.main(
        ["--input", str(src), "--output", str(out), "--config-file", COARSE_CFG, *ORIGINAL_ITC]
    )
    assert "ITC queue" in capsys.readouterr().out
    info = torch.load(out, weights_only=True)["__fiber_d2__"]
    assert (info["stage"], info["target"], info["entry"]) == ("coarse", "coarse", "state_dict")
    queues = sorted(k for k in model_state if k.startswith("queue."))
    assert info["missing_in_checkpoint"] == queues
    model = fresh.coarse()
    incompatible = load_file(model, out)
    assert sorted(incompatible.missing_keys) == queues and incompatible.unexpected_keys == []
    state = model.state_dict()
    for k in model_state:
        if k not in queues:
            assert torch.equal(state[k], expected[k]), k

    # the same file into the detector's backbone, with a config override on the command line
    out_fine = tmp_path / "coarse_for_fine.pth"
    tool.main(
        ["--input", str(src), "--output", str(out_fine), "--target", "fine",
         "--config-file", FINE_CFG, "MODEL.DYHEAD.NUM_CONVS", "1"]
    )  # fmt: skip
    info = torch.load(out_fine, weights_only=True)["__fiber_d2__"]
    assert info["target"] == "fine" and info["opts"] == ["MODEL.DYHEAD.NUM_CONVS", "1"]
    assert not any(k.startswith("head.dyhead_tower.1.") for k in info["missing_in_checkpoint"])
    assert "head.dyhead_tower.0.offset.weight" in info["missing_in_checkpoint"]


def test_without_config(fine_model, originals, tmp_path):
    original, expected, _ = originals.make_fine(fine_model.state_dict(), seed=14)
    src, out = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(original, src)  # a bare state dict
    tool.main(["--input", str(src), "--output", str(out), "--stage", "fine"])
    saved = torch.load(out, weights_only=True)
    assert saved["__fiber_d2__"]["entry"] == "<flat>"
    assert sorted(saved["model"]) == sorted(expected)


def test_a_full_disk_is_one_line(fine_model, originals, tmp_path, monkeypatch):
    """Writing the output failed with an OSError traceback (the write was already whole or
    nothing: the temporary file is removed)."""
    original, _, _ = originals.make_fine(fine_model.state_dict(), seed=14)
    src, out = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(original, src)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tool, "save_checkpoint_file", full_disk)
    with pytest.raises(SystemExit) as err:
        tool.main(["--input", str(src), "--output", str(out), "--stage", "fine"])
    assert err.value.code == f"error: --output {out}: cannot be written: No space left on device"
    assert not out.exists()


def test_errors_are_one_line_and_name_the_file(coarse_model, originals, tmp_path):
    out = str(tmp_path / "out.pth")
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(SystemExit, match="input checkpoint not found: .*nope.pth"):
        tool.main(["--input", missing, "--output", out])

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as err:
        tool.main(["--input", str(garbage), "--output", out])
    assert str(garbage) in str(err.value.code) and "weights_only" in str(err.value.code)
    assert "\n" not in str(err.value.code)

    unsafe = tmp_path / "unsafe.pth"
    with open(unsafe, "wb") as f:
        pickle.dump({"model": _NotATensor()}, f)
    with pytest.raises(SystemExit) as err:
        tool.main(["--input", str(unsafe), "--output", out])
    assert str(unsafe) in str(err.value.code) and "\n" not in str(err.value.code)

    src = tmp_path / "coarse.ckpt"
    torch.save({"state_dict": originals.make_coarse(coarse_model.state_dict())[0]}, src)
    with pytest.raises(SystemExit, match="--target fine does not match"):
        tool.main(
            ["--input", str(src), "--output", out, "--target", "fine", "--config-file", COARSE_CFG]
        )
    with pytest.raises(SystemExit, match="--target coarse applies to a coarse-stage"):
        tool.main(["--input", str(src), "--output", out, "--stage", "fine", "--target", "coarse"])
    with pytest.raises(SystemExit, match="no 'model_ema'"):
        tool.main(["--input", str(src), "--output", out, "--use-ema"])
    # a forced stage that the key names contradict wrote a partial file with exit 0
    with pytest.raises(SystemExit, match="is a coarse-grained checkpoint by its key names, not"):
        tool.main(["--input", str(src), "--output", out, "--stage", "fine"])
    with pytest.raises(SystemExit, match="must differ"):
        tool.main(["--input", str(src), "--output", str(src)])
    with pytest.raises(SystemExit) as err:  # checked before the conversion, not after it
        tool.main(["--input", str(src), "--output", str(garbage / "out.pth")])
    assert err.value.code == (
        f"error: --output {garbage}/out.pth: its folder {garbage} cannot be written: "
        f"{garbage} is a file, not a folder"
    )
    assert not Path(out).exists()


def test_command_line_and_config_errors_do_not_blame_the_checkpoint(
    coarse_model, originals, tmp_path
):
    """An error of the command line or of the target config names that, not the input file."""
    src = tmp_path / "coarse.ckpt"
    torch.save({"state_dict": originals.make_coarse(coarse_model.state_dict())[0]}, src)
    out = str(tmp_path / "out.pth")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("MODEL:\n  NOT_A_KEY: 1\n")
    cases = {
        "config overrides ['MODEL.X', '1'] given without --config-file": ["MODEL.X", "1"],
        f"{bad_cfg}: Non-existent config key: MODEL.NOT_A_KEY": ["--config-file", str(bad_cfg)],
        "--project Nope: no folder projects/Nope": [
            "--config-file",
            COARSE_CFG,
            "--project",
            "Nope",
        ],
        f"--target fine does not match {COARSE_CFG}": [
            "--config-file",
            COARSE_CFG,
            "--target",
            "fine",
        ],
    }
    for message, extra in cases.items():
        with pytest.raises(SystemExit) as err:
            tool.main(["--input", str(src), "--output", out, *extra])
        assert err.value.code.startswith(f"error: {message}"), err.value.code
    assert not Path(out).exists()


def test_caption_checkpoint_end_to_end(coarse_model, originals, tmp_path):
    original, expected, _ = originals.make_coarse(coarse_model.state_dict(), seed=17)
    original["cross_modal_att_layers.0.weight"] = torch.randn(128, 256)
    original["cross_modal_att_layers.0.bias"] = torch.randn(128)
    src, out = tmp_path / "fiber_coco_caption.ckpt", tmp_path / "caption_d2.pth"
    torch.save({"state_dict": original, "epoch": 9}, src)
    tool.main(["--input", str(src), "--output", str(out), "--target", "caption"])
    saved = torch.load(out, weights_only=True)
    assert saved["__fiber_d2__"]["target"] == "caption"
    model = saved["model"]
    assert torch.equal(
        model["cross_modal_att_layers.0.weight"], original["cross_modal_att_layers.0.weight"]
    )
    assert torch.equal(model["image_norm.weight"], expected["image_norm.weight"])
    with pytest.raises(SystemExit, match="no --config-file"):
        tool.main(
            ["--input", str(src), "--output", str(out), "--target", "caption"]
            + ["--config-file", COARSE_CFG]
        )
