"""tools/demo.py run in-process: one drawn image per input, thresholds, prompts, one-line errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_scripts import load_tool

from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
COARSE_CFG = str(ROOT / "configs/Demo/coarse_tiny.yaml")
demo = load_tool("demo")

OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.ATSS.INFERENCE_TH", "0.0",
    "MODEL.ATSS.PRE_NMS_TOP_N", "20",
    "MODEL.ATSS.DETECTIONS_PER_IMG", "5",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
]  # fmt: skip


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
            "--confidence-threshold", "0.0",
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
            "--confidence-threshold", "1.01",
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
    ],
)
def test_bad_input_is_one_error_line(inputs, tmp_path, extra, needle):
    args = ["--config-file", CFG, "--input", str(inputs / "a.png"), "--output", str(tmp_path)]
    args += [a.replace("{in}", str(inputs)) for a in extra]
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
