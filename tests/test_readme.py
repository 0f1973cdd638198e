"""The README's "Inference" and "Your own dataset" code blocks, run verbatim.

They run in a temporary working directory whose ``$HOME`` holds Demo weights at the documented place
(``~/.cache/fiber_d2/demo/model_final.pth``: the Demo architecture, randomly initialised here, since
``make demo``'s training is too long for the suite) and a COCO-format ``my_data/`` folder.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "tools"))
from test_custom_dataset import make_coco_folder  # noqa: E402


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _blocks(section: str, lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME with the Demo weights where the README says they are, and a working directory."""
    from detectron2.modeling import build_model

    from fiber_d2 import model_zoo
    from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer

    home = tmp_path / "home"
    cache = home / ".cache" / "fiber_d2"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FIBER_D2_HOME", raising=False)
    torch.manual_seed(0)
    model = build_model(model_zoo.get_config("demo"))
    (cache / "demo").mkdir(parents=True)
    FIBERCheckpointer(model, save_dir=str(cache / "demo")).save("model_final")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


def test_inference_block_runs_on_the_demo_weights(home):
    block = _blocks(_section("Inference"), "python")[0]
    assert len([line for line in block.splitlines() if line and not line.startswith("from")]) == 3
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)).save("image.png")
    scope = {}
    exec(compile(block, "README.md:Inference", "exec"), scope)
    result, picture = scope["result"], scope["picture"]
    inst = result["instances"]
    assert inst.image_size == (120, 150)
    assert ((inst.scores >= 0.3) & (inst.scores <= 1)).all()
    assert result["pred_labels"] == [result["label_names"][int(c)] for c in inst.pred_classes]
    assert result["label_names"] == ["red circle", "blue square"]
    assert picture.dtype == np.uint8 and picture.ndim == 3 and min(picture.shape[:2]) >= 512
    assert scope["predictor"].max_query_len == 64  # read from the Demo model's text tower


def test_own_dataset_blocks_register_and_train(home, tmp_path):
    section = _section("Your own dataset")
    make_coco_folder(Path("my_data"))
    scope = {}
    exec(compile(_blocks(section, "python")[0], "README.md:Your own dataset", "exec"), scope)
    from detectron2.data import MetadataCatalog

    assert MetadataCatalog.get("my_val").category_prompts == {"traffic cone": "orange traffic cone"}

    yaml_text = _blocks(section, "yaml")[0]
    Path("my_dataset.yaml").write_text(yaml_text)
    command = shlex.split(_blocks(section, "bash")[0].strip())
    assert command[:2] == ["python", "tools/train_net.py"]
    args = [os.path.expanduser(a) for a in command[2:]]
    small = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TEST", "96"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_net.py"), *args, *small],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path("output/my_dataset")
    assert (out / "model_final.pth").is_file()
    assert "bbox" in json.loads((out / "results.json").read_text())


def test_contents_lists_every_section_in_order():
    text = (ROOT / "README.md").read_text()
    contents = re.findall(r"^\* \[([^\]]+)\]\(#([^)]+)\)", _section("Contents"), re.M)
    fence, headings = False, []
    for line in text.splitlines():
        fence ^= line.startswith("```")
        if not fence and line.startswith("## ") and line != "## Contents":
            headings.append(line[3:])
    assert [title for title, _ in contents] == headings
    for title, anchor in contents:  # GitHub's anchors: lower case, spaces to '-', punctuation gone
        assert anchor == re.sub(r"[^\w -]", "", title.lower()).replace(" ", "-"), title
