"""tools/demo.py run in-process: one drawn image per input, thresholds, prompts, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_detector import tiny_detector_opts
from tool_scripts import load_tool

from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
COARSE_CFG = str(ROOT / "configs/Demo/coarse_tiny.yaml")
demo = load_tool("demo")

OPTS = tiny_detector_opts(pre_nms=20, detections=5)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (61, 83), "b.png": (90, 47)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A saved random model, so MODEL.WEIGHTS goes through the checkpointer."""
    from detectron2.modeling import build_model

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = build_model(load_config(CFG, OPTS))
    FIBERCheckpointer(model, save_dir=str(folder)).save("tiny")
    return str(folder / "tiny.pth")


def test_glob_prompt_writes_one_drawn_image_per_input(inputs, weights, tmp_path, capsys):
    out = tmp_path / "out"
    written = demo.main(
        [
            "--config-file", CFG,
            "--input", str(inputs / "*.png"),
            "--prompt", "red circle. blue square.",
            "--output", str(out),
            "--confidence-threshold", "0.0", "--scale", "1",
            "--opts", *OPTS, "MODEL.WEIGHTS", weights,
        ]
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert sorted(written) == sorted(str(p) for p in out.iterdir())
    for name in ("a.png", "b.png"):
        original = np.asarray(Image.open(inputs / name).convert("RGB"))
        drawn = np.asarray(Image.open(out / name).convert("RGB"))
        assert drawn.shape == original.shape
        assert (drawn != original).any()  # threshold 0: every detection is drawn
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(inputs / "a.png"))
    assert "5 of 5 detections" in lines[0] and lines[2].startswith("wrote 2 image(s)")
    assert "best: 'red circle'" in lines[0] or "best: 'blue square'" in lines[0]


def test_caption_phrases_and_high_threshold_leave_image_unchanged(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    demo.main(
        [
            "--config-file", CFG,
            "--input", str(inputs / "a.png"),
            "--caption", "a red circle left of a blue square",
            "--phrases", "red circle", "blue square",
            "--output", str(out),
            "--confidence-threshold", "1.0", "--scale", "1",
            "--opts", *OPTS,
        ]
    )  # fmt: skip
    original = np.asarray(Image.open(inputs / "a.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(out / "a.png").convert("RGB")), original)
    assert "0 of 5 detections" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--input", "{in}/*.jpg", "--prompt", "circle"], "matches no image file"),
        (["--caption", "a red circle", "--phrases", "blue square"], "'blue square' is not in"),
        (["--prompt", " . "], "contains no category name"),
        (["--prompt", "circle", "--opts", "MODEL.NOT_A_KEY", "1"], "MODEL.NOT_A_KEY"),
        (["--prompt", "circle", "--opts", "MODEL.WEIGHTS", "/no/such.pth"], "/no/such.pth"),
        (["--config-file", COARSE_CFG, "--prompt", "circle"], "does not predict boxes"),
        (["--prompt", "circle", "--json", "{file}/r.json"], "{file} is a file, not a folder"),
        (["--prompt", "circle", "--json", "{in}"], "is a folder; give a file name"),
        (["--prompt", "circle", "--output", "{file}/drawn"], "--output {file}/drawn cannot be"),
    ],
)
def test_bad_input_is_one_error_line(inputs, tmp_path, extra, needle):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    args = ["--config-file", CFG, "--input", str(inputs / "a.png"), "--output", str(tmp_path)]
    args += [a.replace("{in}", str(inputs)).replace("{file}", str(a_file)) for a in extra]
    needle = needle.replace("{file}", str(a_file))
    if "--opts" not in args:
        args += ["--opts", "MODEL.DEVICE", "cpu"]
    with pytest.raises(SystemExit) as e:
        demo.main(args)
    message = str(e.value.code)
    assert message.startswith("error:") and needle in message and "\n" not in message
    assert not list(tmp_path.glob("*.png"))


def test_phrases_need_a_caption(inputs):
    with pytest.raises(SystemExit) as e:
        demo.main(["--input", str(inputs / "a.png"), "--prompt", "circle", "--phrases", "circle"])
    assert e.value.code == 2  # argparse usage error


@pytest.fixture
def folder_with_corrupt_image(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, (h, w) in {"a.png": (61, 83), "c.jpg": (40, 52), "d.png": (70, 66)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_with_a_corrupt_image_batches_and_writes_json(
    folder_with_corrupt_image, weights, tmp_path, capsys, monkeypatch
):
    from fiber_d2.modeling.meta_arch.fiber import FIBER

    batches = []
    forward = FIBER.forward
    monkeypatch.setattr(
        FIBER, "forward", lambda self, x: batches.append(len(x)) or forward(self, x)
    )
    out, js = tmp_path / "out", tmp_path / "res" / "results.json"
    written = demo.main(
        [
            "--config-file", CFG, "--input", str(folder_with_corrupt_image),
            "--prompt", "red circle. blue square", "--output", str(out), "--json", str(js),
            "--batch-size", "2", "--threshold", "0.0", "--device", "cpu",
            "--opts", *OPTS, "MODEL.WEIGHTS", weights,
        ]
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.jpg", "d.png"]
    assert len(written) == 3
    assert batches == [1, 2]  # a.png (b.png skipped) then c.jpg + d.png in one pass
    for name in ("a.png", "d.png"):
        assert min(Image.open(out / name).size) >= 512  # small images upscaled for reading
    records = json.loads(js.read_text())
    assert {r["file_name"] for r in records} == {"a.png", "c.jpg", "d.png"}
    assert all(r["label"] in ("red circle", "blue square") for r in records)
    assert all(len(r["bbox"]) == 4 and 0 <= r["score"] <= 1 for r in records)
    assert {r["image_id"] for r in records} == {1, 3, 4}
    text = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in text and "b.png" in text


def test_runs_from_another_directory_with_relative_config(inputs, weights, tmp_path):
    import os
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "tools" / "demo.py"),
            "--config-file", "configs/Demo/fine_tiny.yaml", "--input", str(inputs / "a.png"),
            "--prompt", "circle", "--json", "r.json", "--opts", *OPTS, "MODEL.WEIGHTS", weights,
        ],
        cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["r.json"]
    assert "ETA" in proc.stderr or "<" in proc.stderr  # tqdm's progress bar with remaining time
    assert "torch.jit.script" not in proc.stderr  # fvcore's import warning is filtered


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--weights", "fiber-b/cocoo"], "known names: demo"),
        (["--weights", "fiber-b/coco"], "model_0072500.pth"),
        (["--weights", "demo", "--opts", "MODEL.WEIGHTS", "x.pth"], "give the weights once"),
    ],
)
def test_bad_options_are_one_line(inputs, tmp_path, extra, needle, monkeypatch):
    monkeypatch.setenv("FIBER_D2_HOME", str(tmp_path / "home"))
    args = ["--input", str(inputs / "a.png"), "--prompt", "circle", *extra]
    with pytest.raises(SystemExit) as e:
        demo.main(args)
    message = str(e.value.code)
    assert message.startswith("error:") and needle in message and "\n" not in message


def test_output_names_stay_unique():
    """d2/a.png's drawing replaced d1/a_2.png's: the suffixed name was not checked."""
    names = demo.output_paths(["d1/a.png", "d1/a_2.png", "d2/a.png", "d3/a.png"], "out")
    assert names == ["out/a.png", "out/a_2.png", "out/a_3.png", "out/a_4.png"]


def test_a_scale_too_large_for_an_image_is_one_line(inputs, weights, tmp_path):
    """--scale 100 drew past the drawing limit: a traceback after the forward pass."""
    args = ["--config-file", CFG, "--input", str(inputs / "a.png"), "--prompt", "circle"]
    args += ["--output", str(tmp_path), "--scale", "100", "--opts", *OPTS, "MODEL.WEIGHTS", weights]
    with pytest.raises(SystemExit) as e:
        demo.main(args)
    message = str(e.value.code)
    assert message.startswith(f"error: {inputs / 'a.png'}: scale 100.0 would draw the 61x83 image")
    assert "\n" not in message


def test_no_readable_input_writes_no_json(folder_with_corrupt_image, weights, tmp_path):
    """With every input unreadable the run ends in an error line, and wrote an empty --json
    before it."""
    js = tmp_path / "results.json"
    args = ["--config-file", CFG, "--input", str(folder_with_corrupt_image / "b.png")]
    args += ["--prompt", "circle", "--json", str(js), "--opts", *OPTS, "MODEL.WEIGHTS", weights]
    with pytest.raises(SystemExit) as e:
        demo.main(args)
    assert str(e.value.code).startswith("error: none of the 1 input image(s) could be read")
    assert not js.exists()


def test_without_the_environment_it_names_the_missing_module(tmp_path):
    """Run by a python without fiber_d2 (no site-packages here), the message blamed detectron2."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-S", str(ROOT / "tools" / "demo.py"), "--help"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: fiber_d2 is not importable (No module named 'fiber_d2')")
    assert ".venv/bin/python" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_json_keeps_only_detections_over_the_threshold(inputs, weights, tmp_path, capsys):
    js = tmp_path / "r.json"
    argv = ["--config-file", CFG, "--input", str(inputs / "a.png"), "--prompt", "red circle"]
    opts = ["--json", str(js), "--opts", *OPTS, "MODEL.WEIGHTS", weights]  # --opts takes the rest
    demo.main(argv + ["--threshold", "0.0"] + opts)
    scores = sorted(r["score"] for r in json.loads(js.read_text()))
    assert len(scores) == 5  # DETECTIONS_PER_IMG
    cut = (scores[1] + scores[2]) / 2  # between the 2nd and 3rd lowest: 3 detections above it
    demo.main(argv + ["--threshold", str(cut)] + opts)
    kept = json.loads(js.read_text())
    assert sorted(r["score"] for r in kept) == pytest.approx(scores[2:], abs=1e-6)
