"""``python -m fiber_d2.model_zoo [--update-readme README.md]``: print the model-zoo table, or rewrite
the README's generated block (between ``<!-- model-zoo:begin -->`` and ``<!-- model-zoo:end -->``).
"""

import argparse
import logging
import re
import sys
from pathlib import Path

from ..checkpoint.safe_io import write_whole
from .catalog import markdown_table

logger = logging.getLogger("fiber_d2.model_zoo")

BEGIN, END = "<!-- model-zoo:begin -->", "<!-- model-zoo:end -->"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update-readme", metavar="README.md", help="rewrite the generated block")
    args = parser.parse_args(argv)
    # the table is the command's output: plain messages on stdout
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    table = markdown_table()
    if not args.update_readme:
        logger.info("%s", table)
        return
    path = Path(args.update_readme)
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r"\n(?:.*?\n)?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"error: {path} has no '{BEGIN}' ... '{END}' block")
    with write_whole(str(path), "w", encoding="utf-8") as f:  # a kill mid-write keeps the old file
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))
    logger.info("updated %s", path)


if __name__ == "__main__":
    main()
