"""Install fiber_d2. Dependency pins live in requirements.txt (with their reasons)."""

import re
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


# requirements.txt's lines, tagged in their comments (see its head): "[pip: SPEC]" replaces an exact
# pin of the project environment by a range; "[deploy]" / "[captioning]" lines are optional extras.
EXTRAS = ("deploy", "captioning")
requirements, extras = [], {name: [] for name in EXTRAS}
for line in (here / "requirements.txt").read_text().splitlines():
    spec, _, comment = (part.strip() for part in line.partition("#"))
    if not spec or spec.startswith(("pytest", "ruff")):  # test tooling (black: detectron2's)
        continue
    pip_range = re.search(r"\[pip: ([^\]]+)\]", comment)
    if pip_range:
        spec = re.split(r"[=<>!~]", spec, maxsplit=1)[0] + pip_range.group(1)
    extra = next((name for name in EXTRAS if f"[{name}]" in comment), None)
    (extras[extra] if extra else requirements).append(spec)

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
    # "deploy": ONNX export and the onnxruntime runner; "captioning": the caption metrics of
    # projects/Captioning (the tagged lines of requirements.txt).
    extras_require={"web": ["gradio>=5"], "web-test": ["gradio>=5", "playwright"], **extras},
    cmdclass={"build_py": BuildPyWithConfigs},
    license="MIT",
)
