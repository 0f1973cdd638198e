"""NLVR2 datasets: the official json-lines release, the original's Arrow files and the shapes world.

Records (one per statement): ``file_name_0`` / ``file_name_1`` (or ``arrow_file`` + ``arrow_row``),
``sentence``, ``label`` (1 = "True"), ``identifier``. Evaluator type "nlvr2".

=======================  ===========================================================  ================
name                     files under ``$DETECTRON2_DATASETS``                         images
=======================  ===========================================================  ================
nlvr2_train              nlvr2/data/train.json (one json object per line)             nlvr2/images/
                                                                                      train/<directory>
nlvr2_dev                nlvr2/data/dev.json                                          nlvr2/dev
nlvr2_test1 (test-P)     nlvr2/data/test1.json                                        nlvr2/test1
nlvr2_arrow_{train,dev,  arrow/nlvr2_{train,dev,test1}.arrow (the original's on-disk  in the file
test1}                   format, coarse spec §7; needs ``pyarrow``)
shapes_{train,val}_      the shapes world's annotations/nlvr2_{split}.json            shapes/images
nlvr2                    (generated)
=======================  ===========================================================  ================

Image names follow the release: the identifier without its last ``-<n>`` plus ``-img0.png`` /
``-img1.png``.
"""

from __future__ import annotations

import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from fiber_d2.data.datasets.common import read_arrow_rows
from fiber_d2.data.shapes import SPLITS, shapes_root_in
from fiber_d2.data.shapes_vl import ensure_shapes_vl, shapes_vl_files

__all__ = ["load_nlvr2_json", "load_nlvr2_arrow", "load_shapes_nlvr2", "register_all_nlvr2"]

logger = logging.getLogger(__name__)

NLVR2_SPLITS = ("train", "dev", "test1")


def _label(value, where: str) -> int:
    if value in ("True", "true", True):
        return 1
    if value in ("False", "false", False):
        return 0
    raise ValueError(f"{where}: label must be 'True' or 'False', got {value!r}")


def load_nlvr2_json(annotation_file: str, image_root: str, split: str) -> list[dict]:
    """Records of an official NLVR2 ``{train,dev,test1}.json`` (json lines).

    Raises:
        FileNotFoundError / IsADirectoryError / ValueError with one line naming the file and the
        line (a bad record, a byte that is not UTF-8), or saying that the file holds no records.
    """
    if os.path.isdir(annotation_file):
        raise IsADirectoryError(
            f"NLVR2 annotation file {annotation_file} is a directory, not a file"
        )
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"NLVR2 annotation file not found: {annotation_file}")
    records = []
    # a byte that is not UTF-8 is kept as a lone surrogate, to name its line (below)
    with open(annotation_file, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, 1):
            where = f"{annotation_file}:{line_no}"
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 text (byte {ord(line[e.start]) - 0xDC00:#x} at column "
                    f"{e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: an NLVR2 record is a json object, not {row!r:.40}")
                identifier, sentence = row["identifier"], row["sentence"]
                if not isinstance(identifier, str) or "-" not in identifier:
                    raise ValueError(
                        f"{where}: identifier must be a string like 'train-10171-0-0', got "
                        f"{identifier!r}"
                    )
                if not isinstance(sentence, str) or not sentence.strip():
                    raise ValueError(
                        f"{where}: sentence must be a non-empty string, got {sentence!r}"
                    )
                stem = identifier.rsplit("-", 1)[0]
                folder = (
                    os.path.join(image_root, str(row["directory"]))
                    if split == "train"
                    else image_root
                )
                records.append(
                    {
                        "file_name_0": os.path.join(folder, f"{stem}-img0.png"),
                        "file_name_1": os.path.join(folder, f"{stem}-img1.png"),
                        "sentence": sentence,
                        "label": _label(row["label"], where),
                        "identifier": identifier,
                    }
                )
            except (json.JSONDecodeError, KeyError) as e:
                if isinstance(e, json.JSONDecodeError) and line.lstrip().startswith("["):
                    raise ValueError(
                        f"{where}: the NLVR2 release is json lines (one json object per line), "
                        "not a json list spread over lines"
                    ) from None
                raise ValueError(f"{where}: bad NLVR2 record ({type(e).__name__}: {e})") from None
    if not records:
        raise ValueError(f"{annotation_file}: the NLVR2 file holds no records (no json line)")
    return records


def load_nlvr2_arrow(arrow_file: str) -> list[dict]:
    """Records of one of the original's ``nlvr2_*.arrow`` files (one row per image pair, its
    ``questions`` and ``answers`` lists; images stay in the file).

    Raises:
        FileNotFoundError / IsADirectoryError / ValueError / ImportError with one line naming the
        file (and the row) or the missing package.
    """
    rows = read_arrow_rows(
        arrow_file,
        required=("image_0", "image_1", "questions", "answers", "identifier"),
        read=("questions", "answers", "identifier"),
        what="NLVR2",
    )
    records = []
    for row_index, row in enumerate(rows):
        where = f"{arrow_file} row {row_index}"
        questions, answers = row["questions"], row["answers"]
        if not isinstance(questions, list) or not isinstance(answers, list):
            raise ValueError(
                f"{where}: questions and answers must be lists, got {questions!r:.40} and "
                f"{answers!r:.40}"
            )
        if len(answers) != len(questions):
            raise ValueError(f"{where}: {len(questions)} question(s) but {len(answers)} answer(s)")
        for k, (sentence, answer) in enumerate(zip(questions, answers)):
            records.append(
                {
                    "arrow_file": arrow_file,
                    "arrow_row": row_index,
                    "file_name_0": f"{arrow_file}#{row_index}/image_0",
                    "file_name_1": f"{arrow_file}#{row_index}/image_1",
                    "sentence": sentence,
                    "label": _label(answer, where),
                    "identifier": f"{row['identifier']}#{k}",
                }
            )
    if not records:
        raise ValueError(f"{arrow_file}: the NLVR2 arrow file holds no records ({len(rows)} rows)")
    return records


def load_shapes_nlvr2(split: str, root: str | None = None) -> list[dict]:
    """Records of the shapes world's NLVR2 split (generated on first use)."""
    root = ensure_shapes_vl(root)
    files = shapes_vl_files(root, split)
    with open(files["nlvr2"], encoding="utf-8") as f:
        rows = json.load(f)
    return [
        {
            "file_name_0": os.path.join(files["image_root"], r["file_name_0"]),
            "file_name_1": os.path.join(files["image_root"], r["file_name_1"]),
            "sentence": r["sentence"],
            "label": _label(r["label"], f"{files['nlvr2']} {r['identifier']}"),
            "identifier": r["identifier"],
        }
        for r in rows
    ]


def _register(name: str, loader) -> None:
    if name in DatasetCatalog.list():
        return
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(evaluator_type="nlvr2")


def register_all_nlvr2(root: str | None = None) -> None:
    """Register every NLVR2 dataset of the module table (nothing is read now)."""
    shapes = str(shapes_root_in(root))
    root = root or os.getenv("DETECTRON2_DATASETS", "datasets")
    for split in NLVR2_SPLITS:
        ann = os.path.join(root, "nlvr2", "data", f"{split}.json")
        images = (
            os.path.join(root, "nlvr2", "images", "train")
            if split == "train"
            else (os.path.join(root, "nlvr2", split))
        )
        _register(f"nlvr2_{split}", lambda a=ann, i=images, s=split: load_nlvr2_json(a, i, s))
        arrow = os.path.join(root, "arrow", f"nlvr2_{split}.arrow")
        _register(f"nlvr2_arrow_{split}", lambda p=arrow: load_nlvr2_arrow(p))
    for split in SPLITS:
        _register(f"shapes_{split}_nlvr2", lambda s=split: load_shapes_nlvr2(s, shapes))
