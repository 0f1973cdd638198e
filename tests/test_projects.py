"""Runs the downstream projects' tests (projects/*/tests) inside the main suite (`make test`).

Each project test module is imported under a unique name and its ``test_*`` functions (and pytest
fixtures) are exposed here, so pytest collects them with this file.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = ("Retrieval", "VQA", "NLVR2", "Captioning", "ImageTower")


def _load(project: str) -> dict:
    project_dir = ROOT / "projects" / project
    if str(project_dir) not in sys.path:  # the project's own package (e.g. ``retrieval``)
        sys.path.insert(0, str(project_dir))
    found = {}
    for path in sorted((project_dir / "tests").glob("test_*.py")):
        name = f"projects_{project.lower()}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        for attr, value in vars(module).items():
            is_fixture = hasattr(value, "_fixture_function_marker") or hasattr(
                value, "_pytestfixturefunction"
            )
            if attr.startswith("test_") or is_fixture:
                key = attr if is_fixture else f"test_{path.stem[5:]}__{attr[5:]}"
                if key in found:
                    raise KeyError(f"{path}: '{attr}' clashes with another project test or fixture")
                found[key] = value
    return found


for _project in PROJECTS:
    globals().update(_load(_project))
