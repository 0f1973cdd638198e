"""Arrow files of the original's layout (coarse spec §7) for the VQA and NLVR2 loader tests."""


def arrow_file(path, columns: dict, monkeypatch) -> str:
    """``path`` as an Arrow file of ``columns`` (name -> one value per row): written with pyarrow
    when it is installed, else read back through a stand-in for its table (pyarrow is optional)."""
    from types import SimpleNamespace

    from fiber_d2.data.datasets import common

    try:
        import pyarrow as pa
    except ImportError:
        path.write_bytes(b"ARROW1")  # read by the stand-in
        names = list(columns)

        def to_pylist(selected):
            return [dict(zip(selected, values)) for values in zip(*(columns[c] for c in selected))]

        table = SimpleNamespace(
            column_names=names, select=lambda c: SimpleNamespace(to_pylist=lambda: to_pylist(c))
        )
        monkeypatch.setattr(common, "_open_arrow", lambda p: table)
        return str(path)
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)
