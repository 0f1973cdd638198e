"""read_arrow_rows: the original's Arrow files (coarse spec §7), read for the VQA and NLVR2 loaders;
a file that cannot be read is one line naming it."""

import pytest
from arrow_tables import arrow_file

from fiber_d2.data.datasets.common import read_arrow_rows

COLUMNS = {"image": [b"a", b"b"], "questions": [["q1", "q2"], ["q3"]], "extra": [1, 2]}


def _read(path):
    return read_arrow_rows(
        str(path), required=("image", "questions"), read=("questions",), what="VQA"
    )


def test_the_columns_asked_for_row_by_row(tmp_path, monkeypatch):
    path = arrow_file(tmp_path / "vqav2_val.arrow", COLUMNS, monkeypatch)
    assert _read(path) == [{"questions": ["q1", "q2"]}, {"questions": ["q3"]}]
    columns = {k: v for k, v in COLUMNS.items() if k != "image"}
    path = arrow_file(tmp_path / "vqav2_val.arrow", columns, monkeypatch)
    with pytest.raises(ValueError) as err:
        _read(path)
    assert (
        str(err.value)
        == f"{path}: the VQA arrow file has no column image (it has questions, extra)"
    )


@pytest.mark.parametrize("problem", ["missing", "empty", "folder", "truncated"])
def test_unreadable_arrow_file_is_one_line_naming_it(problem, tmp_path, monkeypatch):
    """A truncated or empty file was pyarrow's "Not an Arrow file" / "File is too small: 0",
    naming no file; a folder read as "file not found"."""
    path = tmp_path / "vqav2_val.arrow"
    if problem == "missing":
        expected = (FileNotFoundError, f"VQA arrow file not found: {path}")
    elif problem == "empty":
        path.write_bytes(b"")
        expected = (ValueError, f"{path}: the VQA arrow file is empty")
    elif problem == "folder":
        path.mkdir()
        expected = (IsADirectoryError, f"VQA arrow file {path} is a directory, not a file")
    else:
        pytest.importorskip("pyarrow")
        data = open(arrow_file(path, COLUMNS, monkeypatch), "rb").read()
        path.write_bytes(data[: len(data) // 2])
        expected = (ValueError, f"{path}: not a readable VQA arrow file (Not an Arrow file)")
    with pytest.raises(expected[0]) as err:
        _read(path)
    assert str(err.value) == expected[1]
