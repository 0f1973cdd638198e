"""A wheel of fiber_d2 (what ``pip install .`` installs) carries ``configs/``, so the model zoo, the
predictor's ``from_pretrained`` and ``configs/...`` paths work outside a source checkout.

The wheel is built from a copy of the files ``setup.py`` reads (the checkout is not written to) and
imported in a fresh interpreter from the unpacked wheel, run from a folder with no ``configs/``.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in the installed copy: every name resolves there, none in the checkout.
PROBE = """
import json, sys
from pathlib import Path
from detectron2.modeling import build_model
import fiber_d2
from fiber_d2 import FIBERPredictor, model_zoo
from fiber_d2.engine.setup import resolve_config_file

site = Path(sys.argv[1]).resolve()
out = {"package": fiber_d2.__file__, "root": str(model_zoo.repo_root())}
out["coco"] = resolve_config_file("configs/FIBER-B/coco.yaml")
cfg = model_zoo.get_config("demo")
out["params"] = sum(p.numel() for p in build_model(cfg).parameters())
for name in ("fiber-b/coco-retrieval-itc",):
    try:
        model_zoo.get_config(name)
    except FileNotFoundError as e:
        out["projects_error"] = str(e)
try:
    FIBERPredictor.from_pretrained("demo", device="cpu")
except FileNotFoundError as e:
    out["weights_error"] = str(e)
# Demo weights where the model zoo looks (random here), then the three lines of the README
import os, numpy as np, torch
home = Path(os.environ["FIBER_D2_HOME"]) / "demo"
home.mkdir(parents=True)
torch.save({"model": build_model(cfg).state_dict()}, home / "model_final.pth")
predictor = FIBERPredictor.from_pretrained("demo", device="cpu")
result = predictor(np.zeros((64, 80, 3), dtype=np.uint8), ["red circle", "blue square"])
out["label_names"] = result["label_names"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The unpacked wheel (a site-packages folder holding ``fiber_d2``)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in (
        "pyproject.toml",
        "setup.py",
        "README.md",
        "requirements.txt",
        "MANIFEST.in",
        "LICENSE",
    ):
        shutil.copy(ROOT / name, src / name)
    for name in ("fiber_d2", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "."]
        + ["-w", str(tmp / "dist")],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp / "dist").glob("fiber_d2-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_ships_every_config(installed):
    shipped = installed / "fiber_d2" / "model_zoo" / "configs"
    expected = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml")) == expected
    assert (shipped / "Demo" / "fine_tiny.yaml").read_text() == (
        ROOT / "configs" / "Demo" / "fine_tiny.yaml"
    ).read_text()


def test_source_distribution_builds_the_same_wheel(installed, tmp_path):
    """``pip install fiber_d2-<version>.tar.gz``: the sdist, built by the backend pyproject.toml
    names (what ``python -m build`` and pip use), holds what setup.py reads and ships."""
    tomllib = pytest.importorskip("tomllib")
    src = installed.parent / "src"
    system = tomllib.loads((src / "pyproject.toml").read_text())["build-system"]
    backend = system["build-backend"]
    subprocess.run(
        [sys.executable, "-c", f"import {backend} as b; b.build_sdist('sdist')"],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (sdist,) = (src / "sdist").glob("fiber_d2-*.tar.gz")
    with tarfile.open(sdist) as t:
        packed = {
            Path(n).relative_to(sdist.name[: -len(".tar.gz")]).as_posix() for n in t.getnames()
        }
    assert {"pyproject.toml", "setup.py", "requirements.txt", "README.md", "LICENSE"} <= packed
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + [str(sdist), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fiber_d2-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = sorted(n for n in z.namelist() if n.endswith(".yaml"))
    assert len(shipped) == len(list((ROOT / "configs").rglob("*.yaml")))
    assert "fiber_d2/model_zoo/configs/Demo/fine_tiny.yaml" in shipped


def test_model_zoo_and_configs_work_from_a_wheel(installed, tmp_path):
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {"PYTHONPATH": str(installed), "FIBER_D2_HOME": str(tmp_path / "home")}
    env.update({k: v for k, v in os.environ.items() if k in ("PATH", "HOME")})
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PROBE, str(installed)],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    package = installed / "fiber_d2"
    assert Path(out["package"]).parent == package
    assert Path(out["root"]) == package / "model_zoo"
    assert Path(out["coco"]) == package / "model_zoo" / "configs" / "FIBER-B" / "coco.yaml"
    assert out["params"] > 1_000_000  # the Demo detector, built from the shipped config
    assert "ship with the source checkout" in out["projects_error"]
    # Weights are looked up under FIBER_D2_HOME only: no checkout, so no make-demo output path.
    assert str(tmp_path / "home" / "demo" / "model_final.pth") in out["weights_error"]
    assert "(or " not in out["weights_error"]
    assert (
        "`make demo` in a clone of the fiber_d2 repository" in out["weights_error"]
    )  # no Makefile here
    assert out["label_names"] == ["red circle", "blue square"]  # predicted with the shipped config


def test_package_metadata_takes_ranges_not_the_environment_pins(installed):
    """``pip install .`` into a user's environment: the exact pins of this project's environment
    (torch, torchvision, Pillow) replaced the user's torch (and the detectron2 built against it);
    the package asks for ranges, keeps detectron2's runtime needs (black: LazyConfig.to_py) and
    makes the checkout's caption metrics an extra."""
    (meta,) = installed.glob("fiber_d2-*.dist-info/METADATA")
    requires = [ln.split(":", 1)[1].strip() for ln in meta.read_text().splitlines()
                if ln.startswith("Requires-Dist:")]  # fmt: skip
    assert requires and not [r for r in requires if "==" in r.split(";")[0]]
    pinned = [ln.split("==")[0] for ln in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in ln.split("#")[0]]  # fmt: skip
    assert {"torch", "torchvision", "Pillow"} <= set(pinned)
    for name in pinned:
        assert any(r.startswith(name + ">=") for r in requires), name
    assert "black" in requires
    assert 'pycocoevalcap; extra == "captioning"' in requires
    assert 'onnxruntime>=1.20; extra == "deploy"' in requires


def test_import_without_detectron2_says_where_to_get_it():
    """detectron2 is not on PyPI, so a plain pip install leaves it out; ``import fiber_d2`` ended in
    a bare "No module named 'detectron2'"."""
    probe = "import sys; sys.modules['detectron2'] = None; import fiber_d2"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fiber_d2 needs detectron2, which is not importable")
    assert "Troubleshooting the detectron2 install" in last
