"""A check shared by the VQA and NLVR2 projects' tests: their ``register_all_*(root)`` reads the
shapes sets from ``root/shapes``, as ``register_all_builtin(root)`` does."""

from detectron2.data import DatasetCatalog

from fiber_d2.data.shapes import SPLITS


def assert_shapes_sets_under_root(datasets_module, task: str, tmp_path, monkeypatch) -> None:
    """Re-register ``shapes_<split>_<task>`` through ``datasets_module.register_all_<task>``
    with ``tmp_path`` as the datasets root and check the root each loader is given.

    Args:
        datasets_module: the project's datasets module (``vqa.datasets``, ``nlvr2.datasets``).
        task: "vqa" or "nlvr2".
    """
    names = [f"shapes_{split}_{task}" for split in SPLITS]
    for name in names:
        monkeypatch.delitem(DatasetCatalog.data, name)  # restored afterwards
    read = []
    monkeypatch.setattr(
        datasets_module, f"load_shapes_{task}", lambda split, root: read.append(root) or []
    )
    getattr(datasets_module, f"register_all_{task}")(str(tmp_path))
    for name in names:
        DatasetCatalog.get(name)
    assert read == [str(tmp_path / "shapes")] * len(SPLITS)
