"""configs/ODinW read tools/prepare_odinw.py's output (full and K-shot), checked on a fake Aquarium export."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tool_scripts import load_tool

from fiber_d2.engine.setup import load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
prepare_odinw = load_tool("prepare_odinw")
EXPORT = "datasets/odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco"
CATS = ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]


def _fake_export(root: Path, images_per_split=14, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "valid", "test"):
        folder = root / EXPORT / split
        folder.mkdir(parents=True)
        images, anns = [], []
        for i in range(images_per_split):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                folder / f"{i}.jpg"
            )
            images.append({"id": i, "file_name": f"{i}.jpg", "height": 32, "width": 32})
            for k in range(2):
                anns.append(
                    {"id": len(anns), "image_id": i, "category_id": 1 + (i + k) % len(CATS),
                     "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}
                )  # fmt: skip
        cats = [{"id": 0, "name": "creatures", "supercategory": "none"}] + [
            {"id": j + 1, "name": n, "supercategory": "creatures"} for j, n in enumerate(CATS)
        ]
        (folder / "_annotations.coco.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )


def test_sample_few_shot_covers_every_category_k_times():
    data = {
        "images": [{"id": i} for i in range(20)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1 + i % 4} for i in range(20)],
        "categories": [{"id": c} for c in (1, 2, 3, 4)],
    }
    subset = prepare_odinw.sample_few_shot(data, 2, seed=0)
    counts = {}
    for a in subset["annotations"]:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    assert counts == {1: 2, 2: 2, 3: 2, 4: 2} and len(subset["images"]) == 8
    assert subset == prepare_odinw.sample_few_shot(data, 2, seed=0)  # deterministic per seed
    assert subset != prepare_odinw.sample_few_shot(data, 2, seed=1)
    with pytest.raises(ValueError, match="--shots must be at least 1"):
        prepare_odinw.sample_few_shot(data, 0)


@pytest.mark.parametrize("name,train_images", [("aquarium_full", 14), ("aquarium_3shot", None)])
def test_odinw_configs_load_prepare_odinw_output(tmp_path, monkeypatch, name, train_images):
    monkeypatch.chdir(tmp_path)
    _fake_export(tmp_path)
    assert (
        prepare_odinw.main([str(tmp_path / "datasets/odinw"), "--shots", "3", "--seed", "0"]) == 0
    )
    # the K-shot subsets are of the training split only: valid/ and test/ keep their full files
    subsets = sorted((tmp_path / "datasets/odinw").rglob("*_3shot_seed0.json"))
    assert [p.parent.name for p in subsets] == ["train"]
    cfg = load_config(str(ROOT / "configs/ODinW" / f"{name}.yaml"))
    validate_config(cfg, training=True)  # every registered file exists
    from detectron2.data import DatasetCatalog, MetadataCatalog

    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    assert MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes == CATS  # background gone
    if train_images is not None:
        assert len(records) == train_images
    else:
        seen = {}
        for r in records:
            for a in r["annotations"]:
                seen[a["category_id"]] = seen.get(a["category_id"], set()) | {r["image_id"]}
        assert len(records) < 14 and all(len(v) >= 3 for v in seen.values()) and len(seen) == 7
    assert cfg.MODEL.WEIGHTS == "" and cfg.SOLVER.IMS_PER_BATCH == 4
