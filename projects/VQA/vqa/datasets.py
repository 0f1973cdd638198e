"""VQAv2 datasets: the official json release, the original's Arrow files and the shapes world.

Records (one per question): ``file_name`` (or ``arrow_file`` + ``arrow_row`` + ``arrow_column``),
``image_id``, ``question_id``, ``question``; with answers also ``answers`` (the 10 human answers, json
and shapes only), ``answer_scores`` ({answer as given: soft score}), ``multiple_choice_answer``,
``answer_type``, ``question_type`` (json and shapes only), ``answer_labels`` ((class, answer) pairs;
Arrow only). Evaluator type "vqa". Json records follow the annotations file's order.

=======================  ============================================================  ==============
name                     files under ``$DETECTRON2_DATASETS``                          images
=======================  ============================================================  ==============
vqav2_train              vqav2/v2_OpenEnded_mscoco_train2014_questions.json,            coco/train2014
                         vqav2/v2_mscoco_train2014_annotations.json
vqav2_val                ..._val2014_questions.json, v2_mscoco_val2014_annotations.json coco/val2014
vqav2_test               vqav2/v2_OpenEnded_mscoco_test2015_questions.json (no answers) coco/test2015
vqav2_test-dev           vqav2/v2_OpenEnded_mscoco_test-dev2015_questions.json          coco/test2015
vqav2_arrow_{train,val,  arrow/vqav2_{train,val,test,test-dev}.arrow (the original's    in the file
test,test-dev}           on-disk format, coarse spec §7; needs ``pyarrow``)
shapes_{train,val}_vqa   the shapes world's annotations/vqa_{split}.json (generated)    shapes/images
=======================  ============================================================  ==============
"""

from __future__ import annotations

import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from fiber_d2.data.datasets.common import read_arrow_rows
from fiber_d2.data.shapes import SPLITS, shapes_root_in
from fiber_d2.data.shapes_vl import ensure_shapes_vl, shapes_vl_files

from .answers import answer_scores

__all__ = [
    "load_vqa_json",
    "load_vqa_arrow",
    "load_shapes_vqa",
    "register_vqa_json",
    "register_vqa_arrow",
    "register_all_vqa",
    "VQA_JSON_SPLITS",
]

logger = logging.getLogger(__name__)

# name -> (questions file's split, annotations file's split or None, COCO image split: the image
# folder and the file names' split)
VQA_JSON_SPLITS = {
    "vqav2_train": ("train2014", "train2014", "train2014"),
    "vqav2_val": ("val2014", "val2014", "val2014"),
    "vqav2_test": ("test2015", None, "test2015"),
    "vqav2_test-dev": ("test-dev2015", None, "test2015"),
}


def _read_json(path: str, what: str):
    """The json in ``path``; a missing, empty or invalid file is one line naming it."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"VQA {what} file {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQA {what} file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.isspace():
        raise ValueError(f"{path}: the VQA {what} file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: the VQA {what} file is not UTF-8 text (byte {data[e.start]:#x} at offset "
            f"{e.start})"
        ) from None
    del data
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:  # a truncated or hand-edited file
        raise ValueError(f"{path}: the VQA {what} file is not valid json ({e})") from None


def load_vqa_json(questions_file: str, annotations_file: str | None, image_root: str, split: str):
    """Records of an official VQAv2 release (questions json + optional annotations json).

    Args:
        questions_file: ``v2_OpenEnded_mscoco_<split>_questions.json``.
        annotations_file: ``v2_mscoco_<split>_annotations.json`` or None (test splits).
        image_root: the COCO image folder.
        split: the COCO file-name split (``COCO_<split>_<id:012d>.jpg``).

    Raises:
        FileNotFoundError / IsADirectoryError: a missing file or a folder (named); ValueError: one
        line naming the file (and the question_id): an empty or invalid file, a malformed record,
        a question_id given twice, a question without annotation or the reverse.
    """
    questions = _entries(questions_file, "questions")
    by_id = {}
    for q in questions:
        qid = _checked(questions_file, q, lambda q=q: _question_id(q))
        if qid in by_id:
            raise ValueError(
                f"{questions_file}: question_id {qid} is given to more than one question"
            )
        by_id[qid] = q
    if not annotations_file:
        return [
            _checked(questions_file, q, lambda q=q: _question_record(q, image_root, split))
            for q in questions
        ]
    annotations = _entries(annotations_file, "annotations")
    records = []
    answered = set()
    # in the annotations' order, which the original's answer vocabulary follows
    for a in annotations:
        qid = _checked(annotations_file, a, lambda a=a: _question_id(a))
        if qid in answered:
            raise ValueError(f"{annotations_file}: question_id {qid} is annotated more than once")
        q = by_id.pop(qid, None)
        if q is None:
            raise ValueError(f"{questions_file}: no question for question_id {qid}")
        answered.add(qid)
        question = _checked(questions_file, q, lambda q=q: _question_record(q, image_root, split))
        records.append(_checked(annotations_file, a, lambda a=a, q=question: _answered(q, a)))
    if by_id:
        raise ValueError(f"{annotations_file}: no annotation for question_id {min(by_id)}")
    return records


def _entries(path: str, key: str) -> list:
    """The list under ``key`` of an official VQA json (one line naming the file if it is not)."""
    data = _read_json(path, key)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: not a VQA {key} file (no {key!r} list at the top level)")
    if not data[key]:
        raise ValueError(f"{path}: the VQA {key} file holds no records (its {key!r} list is empty)")
    return data[key]


def _checked(path: str, entry, build):
    """``build()``, with a malformed entry as one ``ValueError`` line naming the file and its
    ``question_id``."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        qid = entry.get("question_id") if isinstance(entry, dict) else None
        detail = f"no field {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ValueError(f"{path}: question_id {qid}: bad record ({detail})") from None


def _question_id(entry: dict) -> int:
    """The entry's ``question_id`` (an int in the release)."""
    qid = entry["question_id"]
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise ValueError(f"question_id must be an int, got {qid!r}")
    return qid


def _answered(question: dict, a: dict) -> dict:
    """A question record with its annotation's human answers and their soft scores."""
    human = [x["answer"] for x in a["answers"]]
    if not all(isinstance(x, str) for x in human):
        raise ValueError(f"answers must be strings, got {human!r}")
    if "image_id" in a and a["image_id"] != question["image_id"]:
        raise ValueError(
            f"image_id {a['image_id']!r} differs from its question's image_id "
            f"{question['image_id']!r}"
        )
    if not isinstance(a["multiple_choice_answer"], str):
        raise ValueError(
            f"multiple_choice_answer must be a string, got {a['multiple_choice_answer']!r}"
        )
    return dict(
        question,
        answers=human,
        answer_scores=answer_scores(human),
        multiple_choice_answer=a["multiple_choice_answer"],
        answer_type=a.get("answer_type", ""),
        question_type=a.get("question_type", ""),
    )


def _question_record(q: dict, image_root: str, split: str) -> dict:
    if not isinstance(q["image_id"], int):
        raise ValueError(f"image_id must be an integer, got {q['image_id']!r}")
    if not isinstance(q["question"], str) or not q["question"].strip():
        raise ValueError(f"question must be a non-empty string, got {q['question']!r}")
    return {
        "file_name": os.path.join(image_root, f"COCO_{split}_{q['image_id']:012d}.jpg"),
        "image_id": q["image_id"],
        "question_id": q["question_id"],
        "question": q["question"],
    }


def load_vqa_arrow(arrow_file: str):
    """Records of one of the original's ``vqav2_*.arrow`` files (coarse spec §7.2: one row per image).

    Images stay in the file (records point at ``arrow_file`` / ``arrow_row``). Arrow rows carry the
    original's processed answers (label strings and soft scores), not the 10 human answers; the
    ``multiple_choice_answer`` is the highest-scoring label. Test files have empty answer lists.

    Raises:
        FileNotFoundError / IsADirectoryError / ValueError / ImportError with one line naming the
        file (and the row) or the missing package.
    """
    rows = read_arrow_rows(
        arrow_file,
        required=("image", "questions", "question_id", "image_id"),
        read=("questions", "question_id", "image_id", "answers", "answer_labels", "answer_scores"),
        what="VQA",
    )
    records = []
    for row_index, row in enumerate(rows):
        try:
            records.extend(_arrow_row_records(arrow_file, row_index, row))
        except (TypeError, ValueError) as e:
            detail = " ".join(str(e).split())
            if not isinstance(e, ValueError):
                detail = f"bad row ({type(e).__name__}: {detail})"
            raise ValueError(f"{arrow_file} row {row_index}: {detail}") from None
    if not records:
        raise ValueError(f"{arrow_file}: the VQA arrow file holds no records ({len(rows)} rows)")
    return records


def _arrow_row_records(arrow_file: str, row_index: int, row: dict) -> list:
    """The records of one Arrow row (one image, its questions); lists of unequal length raise."""
    questions = row["questions"]
    per_question = {"question_id": row["question_id"]}
    for key in ("answers", "answer_labels", "answer_scores"):
        if row.get(key):  # empty or absent in test files
            per_question[key] = row[key]
    for key, values in per_question.items():
        if len(values) != len(questions):
            raise ValueError(f"{len(questions)} question(s) but {len(values)} in {key}")
    none = [None] * len(questions)
    records = []
    for question, qid, answers, labels, scores in zip(
        questions,
        per_question["question_id"],
        per_question.get("answers", none),
        per_question.get("answer_labels", none),
        per_question.get("answer_scores", none),
    ):
        r = {
            "arrow_file": arrow_file,
            "arrow_row": row_index,
            "arrow_column": "image",
            "file_name": f"{arrow_file}#{row_index}",
            "image_id": row["image_id"],
            "question_id": qid,
            "question": question,
        }
        if answers is not None and scores is not None:
            for key, values in (("answer_scores", scores), ("answer_labels", labels)):
                if values is not None and len(values) != len(answers):
                    raise ValueError(
                        f"question_id {qid}: {len(answers)} answer(s) but {len(values)} in {key}"
                    )
            pairs = {a: float(s) for a, s in zip(answers, scores)}
            r["answer_scores"] = pairs
            r["multiple_choice_answer"] = max(pairs, key=pairs.get) if pairs else ""
            if labels is not None:
                r["answer_labels"] = [(int(k), a) for k, a in zip(labels, answers)]
        records.append(r)
    return records


def load_shapes_vqa(split: str, root: str | None = None):
    """Records of the shapes world's VQA split (generated on first use)."""
    root = ensure_shapes_vl(root)
    files = shapes_vl_files(root, split)
    records = []
    for q in _read_json(files["vqa"], "shapes")["questions"]:
        records.append(
            {
                "file_name": os.path.join(files["image_root"], q["file_name"]),
                "height": q["height"],
                "width": q["width"],
                "image_id": q["image_id"],
                "question_id": q["question_id"],
                "question": q["question"],
                "answers": q["answers"],
                "answer_scores": answer_scores(q["answers"]),
                "multiple_choice_answer": q["answers"][0],
                "answer_type": q["answer_type"],
                "question_type": q["question_type"],
            }
        )
    return records


def _register(name: str, loader) -> None:
    if name in DatasetCatalog.list():
        return
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(evaluator_type="vqa")


def register_vqa_json(root: str) -> None:
    """Register the official json splits (see the module table) under ``root``."""
    for name, (qsplit, asplit, image_split) in VQA_JSON_SPLITS.items():
        questions = os.path.join(root, "vqav2", f"v2_OpenEnded_mscoco_{qsplit}_questions.json")
        annotations = (
            os.path.join(root, "vqav2", f"v2_mscoco_{asplit}_annotations.json") if asplit else None
        )
        image_root = os.path.join(root, "coco", image_split)

        def load(q=questions, a=annotations, i=image_root, s=image_split):
            return load_vqa_json(q, a, i, s)

        _register(name, load)


def register_vqa_arrow(root: str) -> None:
    """Register the original's Arrow files ``<root>/arrow/vqav2_<split>.arrow``."""
    for split in ("train", "val", "test", "test-dev"):
        path = os.path.join(root, "arrow", f"vqav2_{split}.arrow")
        _register(f"vqav2_arrow_{split}", lambda p=path: load_vqa_arrow(p))


def register_all_vqa(root: str | None = None) -> None:
    """Register every VQA dataset of the module table (nothing is read now)."""
    shapes = str(shapes_root_in(root))
    root = root or os.getenv("DETECTRON2_DATASETS", "datasets")
    register_vqa_json(root)
    register_vqa_arrow(root)
    for split in SPLITS:
        _register(f"shapes_{split}_vqa", lambda s=split: load_shapes_vqa(s, shapes))
