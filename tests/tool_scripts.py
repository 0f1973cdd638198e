"""Import the command-line scripts of ``tools/`` (not a package) as modules for the tests.

``tests/`` is on ``sys.path`` because it holds the suite's conftest.py, so test modules in any
sub-folder can ``from tool_scripts import load_tool``.
"""

import importlib.util
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """Execute ``tools/<name>.py`` as the module ``fiber_tools_<name>`` and return it."""
    spec = importlib.util.spec_from_file_location(f"fiber_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
