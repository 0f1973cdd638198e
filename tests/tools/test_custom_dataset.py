"""Your own COCO-format dataset without code: DATASETS.REGISTER in a user yaml, tools/train_net.py run
from another directory, multi-word category names and a per-dataset prompt override."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fiber_d2.engine.setup import ConfigError, load_config, register_config_datasets

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = [{"id": 1, "name": "traffic cone"}, {"id": 2, "name": "fire_hydrant"}]


def make_coco_folder(root: Path, count: int = 4, seed: int = 0) -> Path:
    """``root/images/*.png`` and ``root/{train,val}.json``: coloured boxes on noise, two categories."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    ann_id = 1
    for i in range(count):
        split = "train" if i < count - 1 else "val"
        h, w = 96, 128
        img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        name = f"img_{i}.png"
        splits[split]["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for cat, colour in ((1, (255, 128, 0)), (2, (220, 20, 20))):
            x, y = int(rng.integers(2, w - 40)), int(rng.integers(2, h - 40))
            bw, bh = int(rng.integers(16, 36)), int(rng.integers(16, 36))
            draw.rectangle([x, y, x + bw, y + bh], fill=colour)
            splits[split]["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        img.save(root / "images" / name)
    for split, data in splits.items():
        (root / f"{split}.json").write_text(json.dumps({**data, "categories": CATEGORIES}))
    return root


def user_yaml(folder: Path, out: Path) -> Path:
    text = f"""_BASE_: "configs/Demo/fine_tiny.yaml"
DATASETS:
  REGISTER: [["cones_train", "{folder}/train.json", "{folder}/images"],
             ["cones_val", "{folder}/val.json", "{folder}/images",
              {{"traffic cone": "orange traffic cone"}}]]
  TRAIN: ("cones_train",)
  TEST: ("cones_val",)
MODEL:
  SWIN:
    DEPTHS: [2, 2, 2, 2]
  FIBER:
    NUM_FUSION_LAYERS: 2
SOLVER:
  MAX_ITER: 3
  IMS_PER_BATCH: 2
  WARMUP_ITERS: 1
INPUT:
  MIN_SIZE_TRAIN: (96,)
  MIN_SIZE_TEST: 96
OUTPUT_DIR: "{out}"
"""
    path = folder / "my_dataset.yaml"
    path.write_text(text)
    return path


def test_register_from_config_names_prompts_and_errors(tmp_path):
    folder = make_coco_folder(tmp_path / "data")
    cfg = load_config(str(user_yaml(folder, tmp_path / "out")))  # registers on load
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from fiber_d2.data.mapper import GroundingDatasetMapper

    records = DatasetCatalog.get("cones_train")
    assert len(records) == 3 and all(r["task"] == "detection" for r in records)
    assert MetadataCatalog.get("cones_train").thing_classes == ["traffic cone", "fire_hydrant"]
    mapper = GroundingDatasetMapper(cfg, is_train=False, dataset_names=["cones_val"])
    DatasetCatalog.get("cones_val")
    assert mapper.category_names("cones_val") == ["orange traffic cone", "fire hydrant"]
    assert mapper.category_names("cones_train") == ["traffic cone", "fire hydrant"]
    assert register_config_datasets(cfg) == ["cones_train", "cones_val"]  # again: a no-op

    cfg.defrost()
    cfg.DATASETS.REGISTER = [["cones_train", str(folder / "val.json"), str(folder / "images")]]
    register_config_datasets(cfg)  # a config's own name: replaced by the new files
    assert len(DatasetCatalog.get("cones_train")) == 1
    cfg.DATASETS.REGISTER = [["shapes_val_det", str(folder / "val.json"), str(folder / "images")]]
    with pytest.raises(ConfigError, match="'shapes_val_det' is already registered"):
        register_config_datasets(cfg)
    cfg.DATASETS.REGISTER = [["x", str(folder / "missing.json"), str(folder / "images")]]
    with pytest.raises(ConfigError, match=r"REGISTER\[0\] \(x\): annotation file not found"):
        register_config_datasets(cfg, check_files=True)
    cfg.DATASETS.REGISTER = [["x", str(folder / "val.json")]]
    with pytest.raises(ConfigError, match=r"REGISTER\[0\] must be"):
        register_config_datasets(cfg)


def test_train_net_fine_tunes_on_a_coco_folder_from_any_directory(tmp_path):
    folder = make_coco_folder(tmp_path / "data")
    out = tmp_path / "out"
    yaml_path = user_yaml(folder, out)
    elsewhere = tmp_path / "somewhere_else"
    elsewhere.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", str(yaml_path)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    results = json.loads((out / "results.json").read_text())
    assert {"AP", "AP50"} <= set(results["bbox"])
    log = (out / "log.txt").read_text()
    assert "cones_train" in log and "loss_cls" not in log  # the always-zero loss is not logged
    assert "torch.jit.script" not in proc.stderr  # fvcore's import-time warning is filtered
    assert list(elsewhere.iterdir()) == []  # nothing written into the working directory
