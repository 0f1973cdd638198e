"""Install fiber_d2. Dependency pins live in requirements.txt (with their reasons)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
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
        "web": ["gradio>=4"],
        "web-test": ["gradio>=4", "playwright"],
        "deploy": deploy,
    },
    license="MIT",
)
