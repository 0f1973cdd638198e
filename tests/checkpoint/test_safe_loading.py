"""Safe checkpoint loading: numpy-only .pkl, safetensors both ways, original layouts converted on the
fly (once, with the converter's code), strict weights, and the converter's refusals."""

import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tool_scripts import load_tool

from fiber_d2.checkpoint import (
    CheckpointError,
    FIBERCheckpointer,
    load_checkpoint_file,
    save_checkpoint_file,
)
from fiber_d2.checkpoint import checkpointer as checkpointer_module
from fiber_d2.checkpoint.layout import convert_original
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
FINE_CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
tool = load_tool("convert_fiber_checkpoint")


def _equal_states(model, expected):
    state = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(state[k], torch.as_tensor(v)), k


def _random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in model.state_dict().items()
    }


def test_model_zoo_pkl_with_numpy_arrays_loads(fresh, tmp_path):
    model = fresh.fine()
    state = _random_state(model, 1)
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:  # detectron2 model-zoo layout: numpy arrays + author
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "someone"}, f)
    FIBERCheckpointer(model).load(str(path))
    _equal_states(model, state)


class Thing:
    """Any class: a restricted .pkl must not build it."""


def test_pkl_with_any_other_object_is_refused(tmp_path):
    path = tmp_path / "thing.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": np.zeros(2)}, "extra": Thing()}, f)
    with pytest.raises(CheckpointError, match="refusing to load .*thing.pkl: it holds .*Thing"):
        load_checkpoint_file(str(path))
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt.pkl"):
        load_checkpoint_file(str(corrupt))


def test_a_file_that_is_no_checkpoint_gets_one_line_without_unsafe_advice(tmp_path):
    """torch's refusal starts with advice to load the file unrestricted; the error gives the
    unpickler's detail instead, on one line naming the file."""
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(str(junk))
    message = str(err.value)
    assert str(junk) in message and "not a readable checkpoint" in message
    assert "\n" not in message and "False" not in message and "arbitrary code" not in message


def test_pkl_with_persistent_ids_is_refused(tmp_path):
    """Pickles that reference outside storage (as torch's legacy format does) are refused, not
    loaded with holes."""

    class _ExternalArrays(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", "0") if isinstance(obj, np.ndarray) else None

    path = tmp_path / "legacy.pkl"
    with open(path, "wb") as f:
        _ExternalArrays(f).dump({"model": {"a": np.zeros(2)}})
    with pytest.raises(CheckpointError, match="refusing to load .*legacy.pkl: it holds persistent"):
        load_checkpoint_file(str(path))


def test_safetensors_write_and_read(fresh, tmp_path):
    model = fresh.fine()
    state = _random_state(model, 2)
    path = tmp_path / "weights.safetensors"
    save_checkpoint_file(str(path), state, {"source": "test"})
    loaded = load_checkpoint_file(str(path))
    assert loaded["__fiber_d2__"] == {"source": "test"}
    FIBERCheckpointer(model).load(str(path))
    _equal_states(model, state)
    # the converter writes safetensors too, and refuses its own output as input
    assert not (tmp_path / "weights.safetensors.tmp").exists()
    assert not list(tmp_path.glob("*.tmp*"))


def test_original_layout_is_converted_on_the_fly_once(
    fine_model, fresh, originals, tmp_path, caplog
):
    original, expected, _ = originals.make_fine(fine_model.state_dict(), seed=21)
    src = tmp_path / "original_fine.pth"
    torch.save({"model": original}, src)
    checkpointer_module._LOGGED_CONVERSIONS.discard(str(src))
    model = fresh.fine()
    with caplog.at_level(logging.WARNING, logger="fiber_d2.checkpoint.checkpointer"):
        FIBERCheckpointer(model).load(str(src))
        FIBERCheckpointer(fresh.fine()).load(str(src))
    assert caplog.text.count("ORIGINAL FIBER fine layout; converted on the fly") == 1
    _equal_states(model, expected)
    # the same result as the converter's code path
    converted, report = convert_original(
        {"model": original}, stage="fine", target="fine", model_state=fine_model.state_dict()
    )
    _equal_states(model, converted)
    assert report.counts()["shape_mismatches"] == 0


def test_strict_weights_list_the_missing_groups(fine_model, fresh, tmp_path):
    state = {k: v for k, v in fine_model.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "no_head.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        FIBERCheckpointer(fresh.fine()).load(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "head.cls_logits" in message and "MODEL.WEIGHTS_PARTIAL_OK" in message
    FIBERCheckpointer(fresh.fine(), partial_ok=True).load(str(path))  # opted in: loads


def test_coarse_checkpoint_into_the_detector_is_not_partial(coarse_model, fresh, tmp_path):
    """The coarse -> fine hand-off leaves FPN, head and output norms to the fine stage."""
    path = tmp_path / "coarse_final.pth"
    torch.save({"model": coarse_model.state_dict()}, path)
    FIBERCheckpointer(fresh.fine()).load(str(path))  # no CheckpointError
    towers_only = {k: v for k, v in coarse_model.state_dict().items() if "image_tower" in k}
    torch.save({"model": towers_only}, path)
    with pytest.raises(CheckpointError, match="text_tower"):  # a tower missing is not expected
        FIBERCheckpointer(fresh.fine()).load(str(path))


def test_pre_flight_check_is_quiet_and_still_strict(fine_model, tmp_path):
    """The check before a run loads the file into a meta-device model: no warning per tensor
    (torch's "copying ... to a meta parameter" for each of them), the same refusal as a real load.
    """
    path = tmp_path / "weights.pth"
    torch.save({"model": fine_model.state_dict()}, path)
    cfg = load_config(FINE_CFG, ["MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(tmp_path / "out")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointer_module.check_weights_before_run(cfg, resume=False)
    assert [str(w.message) for w in caught] == []
    checkpointer_module._PRELOADED.clear()
    state = {k: v for k, v in fine_model.state_dict().items() if not k.startswith("head.")}
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="head.cls_logits"):
        checkpointer_module.check_weights_before_run(cfg, resume=False)
    checkpointer_module._PRELOADED.clear()


def test_converter_refusals(fine_model, originals, tmp_path, capsys):
    original, _, _ = originals.make_fine(fine_model.state_dict(), seed=22)
    src = tmp_path / "fine.pth"
    torch.save({"model": original}, src)
    out = tmp_path / "fine_d2.safetensors"
    tool.main(["--input", str(src), "--output", str(out), "--config-file", FINE_CFG])
    assert load_checkpoint_file(str(out))["__fiber_d2__"]["stage"] == "fine"
    # an already converted file (.safetensors or .pth) is recognised
    pth = tmp_path / "fine_d2.pth"
    tool.main(["--input", str(src), "--output", str(pth)])
    for converted in (out, pth):
        with pytest.raises(SystemExit, match="already in fiber_d2's layout") as err:
            tool.main(["--input", str(converted), "--output", str(tmp_path / "again.pth")])
        assert "\n" not in str(err.value.code) and str(converted) in str(err.value.code)
    # nothing mapped
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"rpn.foo.weight": torch.zeros(1), "x.y": torch.zeros(1)}}, junk)
    with pytest.raises(SystemExit, match="no tensor was mapped"):
        tool.main(["--input", str(junk), "--output", str(tmp_path / "j.pth"), "--stage", "fine"])
    # a shape mismatch with the target config: non-zero exit, nothing written
    target = tmp_path / "mismatch.pth"
    with pytest.raises(SystemExit, match="shape mismatch"):
        tool.main(
            ["--input", str(src), "--output", str(target), "--config-file", FINE_CFG,
             "MODEL.DYHEAD.NUM_CLASSES", "7", "MODEL.FPN.OUT_CHANNELS", "32"]
        )  # fmt: skip
    assert not target.exists() and not (tmp_path / "j.pth").exists()
    assert "shape mismatch" in capsys.readouterr().err  # the report is printed first


def test_a_file_torch_cannot_read_is_named_for_what_it_looks_like(tmp_path):
    """torch's own reason for a text file was a bare number ("101")."""
    from fiber_d2.checkpoint.safe_io import CheckpointError, load_checkpoint_file

    text = tmp_path / "notes.pth"
    text.write_text("hello world\n")
    with pytest.raises(CheckpointError, match="not a torch checkpoint") as err:
        load_checkpoint_file(str(text))
    assert str(text) in str(err.value) and "\n" not in str(err.value)
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="truncated or damaged torch zip archive"):
        load_checkpoint_file(str(cut))


def test_weights_with_nan_are_warned(tmp_path, caplog):
    """A diverged run's weights loaded without a word, and the model then predicted nothing."""
    model = torch.nn.Linear(2, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bias"][0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING):
        FIBERCheckpointer(model).load(str(path))
    assert "1 of 2 tensors hold NaN or infinite values (first: bias)" in caplog.text
    caplog.clear()
    torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, path)  # finite: no warning
    with caplog.at_level(logging.WARNING):
        FIBERCheckpointer(model).load(str(path))
    assert "NaN" not in caplog.text


class _System:
    """Unpickling it would run a shell command (it is never unpickled here)."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_a_blocked_module_is_named_as_refused(tmp_path):
    """torch words a global of a blocked module (os.system) differently from one off its allow-list:
    the file was reported as "a truncated or damaged torch zip archive", with torch's advice to load
    it with weights_only=False. Now it is refused by name, without that advice."""
    import torch

    from fiber_d2.checkpoint import CheckpointError, load_checkpoint_file

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": _System()}}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(str(path))
    message = str(err.value)
    assert message.startswith(f"refusing to load {path}: it holds ") and ".system" in message
    assert "weights_only set to False" not in message and "damaged" not in message


def test_strict_weights_count_elements_as_well_as_tensors(tmp_path):
    """One tensor of 151 is under the 1 % tolerance by count; missing, the large one is most of the
    weights and is refused, where a missing small one is tolerated."""
    model = torch.nn.Module()
    model.small = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(1)) for _ in range(150)])
    model.large = torch.nn.Parameter(torch.ones(100, 100))
    state = model.state_dict()
    path = tmp_path / "without_large.pth"
    torch.save({"model": {k: v for k, v in state.items() if k != "large"}}, path)
    with pytest.raises(CheckpointError, match="large"):
        FIBERCheckpointer(model).load(str(path))
    path = tmp_path / "without_one_small.pth"
    torch.save({"model": {k: v for k, v in state.items() if k != "small.0"}}, path)
    incompatible = FIBERCheckpointer(model).load_weights_file(str(path))
    assert incompatible.missing_keys == ["small.0"]


def test_protocol_2_pkl_with_numpy_arrays_loads(tmp_path):
    """A protocol-2 pickle (the newest that Python 2 wrote) stores array bytes as latin-1 text
    rebuilt by ``_codecs.encode``, which the restricted unpickler allows for text only."""
    arrays = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "n": np.array([3, -1], dtype=np.int64),
        "s": np.float32(0.25),
    }
    path = tmp_path / "zoo2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "someone"}, f, protocol=2)
    assert b"_codecs" in path.read_bytes()  # the path under test is taken
    loaded = load_checkpoint_file(str(path))
    assert loaded["__author__"] == "someone"
    for key, value in arrays.items():
        got = loaded["model"][key]
        assert np.asarray(got).dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(got, value)

    # _codecs.encode of anything but text is refused, not called
    bad = tmp_path / "encode.pkl"
    bad.write_bytes(b"\x80\x02c_codecs\nencode\nK\x01X\x06\x00\x00\x00latin1\x86R.")
    with pytest.raises(
        CheckpointError,
        match="refusing to load .*encode.pkl: it holds _codecs.encode with non-text",
    ):
        load_checkpoint_file(str(bad))


def test_missing_or_corrupt_safetensors_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {missing}$"):
        load_checkpoint_file(str(missing))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(str(corrupt))
    message = str(err.value)
    assert message.startswith(f"cannot read {corrupt} as safetensors: ") and "\n" not in message


def test_safetensors_provenance_that_is_not_json_is_kept_as_text(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"__fiber_d2__": "written by hand"})
    loaded = load_checkpoint_file(str(path))
    assert loaded["__fiber_d2__"] == "written by hand"
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_checkpoint_shapes_the_loader_accepts_and_refuses(tmp_path, caplog):
    """A bare state dict and a Caffe2 ``blobs`` .pkl (momentum blobs dropped) load; a file that holds
    no dict, a 'model' entry that is no dict and a .pkl without either are one line naming the file;
    a tensor of another shape refuses the file when it is most of the weights, and is named in the
    log and kept as it was under ``partial_ok``."""
    model = torch.nn.Linear(2, 2)
    bare = tmp_path / "bare.pth"
    torch.save({"weight": torch.full((2, 2), 3.0), "bias": torch.zeros(2)}, bare)
    FIBERCheckpointer(model).load(str(bare))
    assert torch.equal(model.weight.detach(), torch.full((2, 2), 3.0))

    blobs = tmp_path / "caffe2.pkl"
    with open(blobs, "wb") as f:
        pickle.dump(
            {
                "blobs": {
                    "weight": np.full((2, 2), 2.0, dtype=np.float32),
                    "bias": np.ones(2, dtype=np.float32),
                    "weight_momentum": np.zeros((3, 3), dtype=np.float32),
                }
            },
            f,
        )
    with caplog.at_level(logging.INFO):
        FIBERCheckpointer(model).load(str(blobs))
    assert "momentum" not in caplog.text  # dropped before matching, so not reported as unused
    caplog.clear()
    assert torch.equal(model.weight.detach(), torch.full((2, 2), 2.0))
    assert torch.equal(model.bias.detach(), torch.ones(2))

    refusals = {
        "list.pth": ([1, 2], "list.pth holds a list, not a checkpoint dict"),
        "entry.pth": ({"model": [1]}, "entry.pth: its 'model' entry is not a state dict"),
    }
    for name, (content, expected) in refusals.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=expected):
            FIBERCheckpointer(model).load(str(tmp_path / name))
    no_blobs = tmp_path / "noblobs.pkl"
    with open(no_blobs, "wb") as f:
        pickle.dump({"blobs": [1]}, f)
    with pytest.raises(CheckpointError, match="noblobs.pkl: no 'model' or 'blobs' dict"):
        FIBERCheckpointer(model).load(str(no_blobs))

    reshaped = tmp_path / "reshaped.pth"
    torch.save({"model": {"weight": torch.ones(3, 2), "bias": torch.zeros(2)}}, reshaped)
    with pytest.raises(CheckpointError, match="weight\\(1\\)"):
        FIBERCheckpointer(model).load(str(reshaped))
    with caplog.at_level(logging.WARNING):
        FIBERCheckpointer(model, partial_ok=True).load(str(reshaped))
    assert "Skipped weight: checkpoint shape (3, 2), model shape (2, 2)" in caplog.text
    assert torch.equal(model.weight.detach(), torch.full((2, 2), 2.0))  # kept, not overwritten
