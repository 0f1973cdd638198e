"""Install fiber_d2. Dependency pins live in requirements.txt (with their reasons)."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

here = Path(__file__).parent


class BuildPyWithConfigs(build_py):
    """Ship ``configs/`` inside the package (``fiber_d2/model_zoo/configs``), so that a wheel install
    has the model zoo's and the Demo's configs; a source checkout (and ``pip install -e .``) reads
    them from the repository (``fiber_d2.model_zoo.repo_root``). The projects' configs and code stay
    in the checkout."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fiber_d2" / "model_zoo" / "configs"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(here / "configs", target, ignore=shutil.ignore_patterns("*.pyc"))

requirements, deploy = [], []
for line in (here / "requirements.txt").read_text().splitlines():
    name, _, comment = line.partition("#")
    if not name.strip() or line.startswith(("pytest", "ruff", "black")):
        continue
    # "[deploy]" lines: ONNX export / onnxruntime, optional (pip install fiber_d2[deploy])
    (deploy if "[deploy]" in comment else requirements).append(name.strip())

setup(
    name="fiber_d2",
    version="0.1.0",
    description="FIBER (fusion-in-the-backbone vision-language model) as a detectron2 plugin",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fiber_d2", "fiber_d2.*"]),
    # detectron2 is not on PyPI: scripts/setup_env.sh installs it (see README).
    install_requires=requirements,
    # Optional extras (not core dependencies): `pip install fiber_d2[web]` for tools/web_demo.py
    # (Gradio); "web-test" adds Playwright, which drives the page in headless Chromium (make web-test);
    # "deploy": ONNX export and the onnxruntime runner (the "[deploy]" lines of requirements.txt).
    extras_require={
        "web": ["gradio>=5"],
        "web-test": ["gradio>=5", "playwright"],
        "deploy": deploy,
    },
    cmdclass={"build_py": BuildPyWithConfigs},
    license="MIT",
)
