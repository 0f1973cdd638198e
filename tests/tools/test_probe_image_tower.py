"""tools/probe_image_tower.py: the shapes presence probe of the image tower."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fiber_d2.data.shapes import ensure_shapes_world, shapes_files

ROOT = Path(__file__).resolve().parents[2]
COARSE = str(ROOT / "configs" / "Demo" / "coarse_tiny.yaml")
SMALL = ["INPUT.IMAGE_SIZE", "64", "MODEL.SWIN.WINDOW_SIZE", "2"]


def _tool():
    spec = importlib.util.spec_from_file_location("probe_tool", ROOT / "tools/probe_image_tower.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_presence_labels_match_the_annotations():
    tool = _tool()
    root = ensure_shapes_world()
    x, y = tool.presence_data(root, "val", 64)
    with open(shapes_files(root, "val")["det"], encoding="utf-8") as f:
        det = json.load(f)
    assert x.shape == (len(det["images"]), 3, 64, 64) and x.dtype == torch.uint8
    first = det["images"][0]["id"]
    cats = {a["category_id"] for a in det["annotations"] if a["image_id"] == first}
    assert set((y[0].nonzero().flatten() + 1).tolist()) == cats


def test_probe_learns_the_training_labels(capsys):
    tool = _tool()
    argv = ["--config-file", COARSE, "--steps", "60", "--eval-period", "30", "--batch", "8"]
    records = tool.main(argv + ["--stage", "res3", "--pool", "max", "--lr", "1e-3", *SMALL])
    printed = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert printed == records and [r["step"] for r in records] == [30, 60]
    for r in records:
        assert 0.0 <= r["val_label_acc"] <= 1.0 and 0.5 < r["val_majority"] < 1.0
        assert (r["stage"], r["pool"], r["image_size"], r["num_train"]) == ("res3", "max", 64, 256)
    # beyond each category's commoner label on the images it trains on (seeded: 0.687 vs 0.667)
    assert records[-1]["train_label_acc"] > records[-1]["train_majority"] + 0.01


def test_bigger_world_extends_the_default_one(tmp_path):
    tool = _tool()
    root = tool.world_root(258, str(tmp_path / "world"))
    default = ensure_shapes_world()
    assert len(list((root / "images" / "train").iterdir())) == 258
    same = ["images/train/000001.png", "images/train/000256.png", "annotations/det_val.json"]
    for name in same:
        assert (root / name).read_bytes() == (default / name).read_bytes(), name


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--stage", "res9"], "error: --stage 'res9' is not one of"),
        (["--eval-period", "0"], "error: --eval-period must be at least 1, got 0"),
        (["--steps", "0"], "error: --steps must be at least 1, got 0"),
        (["--batch", "0"], "error: --batch must be at least 1, got 0"),
        (["MODEL.FOO", "1"], "MODEL.FOO"),
        (["MODEL.WEIGHTS", "/no/such.pth"], "/no/such.pth"),
    ],
)
def test_bad_input_is_one_error_line(extra, needle):
    """Each was a traceback (ZeroDivisionError for --eval-period 0); --steps 0 printed nothing."""
    tool = _tool()
    flags, opts = (extra, []) if extra[0].startswith("--") else ([], extra)
    with pytest.raises(SystemExit) as err:  # config overrides come last (argparse REMAINDER)
        tool.main(["--config-file", COARSE, "--steps", "1", *flags, *SMALL, *opts])
    message = str(err.value.code)
    assert message.startswith("error:") and needle in message and "\n" not in message


@pytest.mark.parametrize("control", ["cnn", "timm-swin"])
def test_control_networks_run_on_the_same_data(control, capsys):
    tool = _tool()
    argv = ["--config-file", COARSE, "--steps", "10", "--eval-period", "10", "--batch", "4"]
    (record,) = tool.main(argv + ["--control", control, *SMALL])
    assert (record["tower"], record["stage"], record["image_size"]) == (control, "last", 64)
    assert 0.0 <= record["val_label_acc"] <= 1.0 and record["num_train"] == 256


@pytest.mark.parametrize("control", ["cnn", "timm-swin"])
def test_control_probe_outputs_and_trains_its_first_layer(control):
    from timm.models.swin_transformer import SwinTransformer

    from fiber_d2.engine.setup import load_config

    tool = _tool()
    cfg = load_config(COARSE, SMALL)
    probe = tool.ControlProbe(control, cfg, "mean")
    assert isinstance(probe.features, SwinTransformer) == (control == "timm-swin")
    if control == "timm-swin":
        assert probe.features.embed_dim == cfg.MODEL.SWIN.EMBED_DIM
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    logits = probe(images)
    assert logits.shape == (4, 12)
    logits.sum().backward()
    first = next(p for p in probe.features.parameters() if p.dim() == 4)  # the first convolution
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_unknown_control_is_one_clear_error():
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.main(["--config-file", COARSE, "--control", "resnet", *SMALL])
