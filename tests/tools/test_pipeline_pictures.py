"""make demo's prediction pictures (tools/pretrain_pipeline.py visualize): readable size, ground truth
and prediction side by side."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tool_scripts import load_tool

from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.engine.setup import load_config

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/Demo/fine_tiny.yaml")
OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
]  # fmt: skip


def test_pictures_are_large_and_side_by_side(tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(load_config(CFG, OPTS))
    FIBERCheckpointer(model, save_dir=str(tmp_path)).save("tiny")
    pipeline = load_tool("pretrain_pipeline")
    written = pipeline.visualize(CFG, str(tmp_path / "tiny.pth"), str(tmp_path / "p"), OPTS, 2)
    assert len(written) == 2
    record = DatasetCatalog.get("shapes_val_grounding")[0]
    h, w = record["height"], record["width"]
    picture = np.asarray(Image.open(written[0]))
    assert picture.shape[0] > 512 and picture.shape[1] > 2 * 512  # two upscaled panels + titles
    assert picture.shape[1] >= 2 * round(w * 512 / min(h, w))
