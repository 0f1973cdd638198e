"""Makes the project package (``nlvr2``) and the suite's test helpers importable when pytest runs
this folder directly."""

import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# and the suite's shared test helpers (tests/arrow_tables.py)
for path in (PROJECT_ROOT, PROJECT_ROOT.parents[1] / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
