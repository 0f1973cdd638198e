"""``python -m fiber_d2.model_zoo [--update-readme README.md]``: print the model-zoo table, or rewrite
the README's generated block (between ``<!-- model-zoo:begin -->`` and ``<!-- model-zoo:end -->``).
"""

import argparse
import re
import sys
from pathlib import Path

from .catalog import markdown_table

BEGIN, END = "<!-- model-zoo:begin -->", "<!-- model-zoo:end -->"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update-readme", metavar="README.md", help="rewrite the generated block")
    args = parser.parse_args(argv)
    table = markdown_table()
    if not args.update_readme:
        print(table)
        return
    path = Path(args.update_readme)
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r"\n(?:.*?\n)?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"error: {path} has no '{BEGIN}' ... '{END}' block")
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
