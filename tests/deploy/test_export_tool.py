"""tools/deploy/export_model.py: bad input ends with one clear line, before anything is traced."""

import json
from pathlib import Path

import pytest
from tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    return load_tool("deploy/export_model")


def test_coarse_config_names_supported_exports(tool, tmp_path):
    argv = ["--config-file", str(ROOT / "configs/Demo/coarse_tiny.yaml"), "--format", "onnx"]
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--output", str(tmp_path), "--opts", "MODEL.DEVICE", "cpu"])
    message = str(exc.value.code)
    assert message.startswith("error: MODEL.META_ARCHITECTURE 'FIBERCoarse' cannot be exported")
    assert "onnx, torchscript" in message and "'FIBER'" in message
    assert not any(tmp_path.iterdir())


def test_unknown_format_is_refused(tool, tmp_path):
    argv = ["--config-file", str(ROOT / "configs/Demo/fine_tiny.yaml"), "--format", "tensorrt"]
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--output", str(tmp_path)])
    assert exc.value.code == 2  # argparse: invalid choice


def test_phrases_need_a_caption(tool, tmp_path):
    argv = ["--config-file", str(ROOT / "configs/Demo/fine_tiny.yaml"), "--format", "onnx"]
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--output", str(tmp_path), "--prompt", "cat", "--phrases", "cat"])
    assert str(exc.value.code) == "error: --phrases needs --caption"


def test_output_that_cannot_be_written_is_one_line(tool, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["--config-file", str(ROOT / "configs/Demo/fine_tiny.yaml"), "--format", "onnx"]
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--output", str(blocker / "export"), "--opts", "MODEL.DEVICE", "cpu"])
    assert exc.value.code == (
        f"error: --output {blocker}/export cannot be written: {blocker} is a file, not a folder"
    )


def test_benchmark_export_task_refuses_coarse_config():
    bench = load_tool("benchmark")
    argv = ["--config-file", str(ROOT / "configs/Demo/coarse_tiny.yaml"), "--task", "export"]
    with pytest.raises(SystemExit) as exc:
        bench.main(argv + ["--device", "cpu"])
    assert str(exc.value.code) == (
        "error: --task export needs the fine-grained detector (FIBER) config"
    )


@pytest.mark.parametrize("sample", ["random", "square"])
def test_export_and_verify(tool, tmp_path, capsys, sample):
    """The tool exports the tiny detector and --verify finds eager's detections on two image
    sizes and two prompt lengths other than the sample's. A square sample image: one of the two
    checked sizes was the sample's (a square) before."""
    import numpy as np
    from PIL import Image
    from test_export import TINY

    argv = ["--config-file", str(ROOT / "configs/Demo/fine_tiny.yaml"), "--format", "torchscript"]
    argv += ["--output", str(tmp_path), "--prompt", "red circle. blue square", "--verify"]
    if sample == "square":
        pixels = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "sample.png")
        argv += ["--sample-image", str(tmp_path / "sample.png")]
    path = tool.main(argv + ["--opts", *TINY])
    assert Path(path) == tmp_path / "model.ts" and (tmp_path / "fiber_export.json").is_file()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 4
    for line in lines:
        assert line["ok"] and line["same_detections"] and line["detections"] > 0
        assert line["unseen_size"] and line["unseen_text_len"]
    assert len({(tuple(x["padded_size"]), x["text_len"]) for x in lines}) == 4


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--prompt", ""], "contains no category name"),  # was exported with the prompt "object"
        (["--opts", "MODEL.WEIGHTS", "/no/such.pth"], "/no/such.pth"),
    ],
)
def test_a_refused_export_leaves_no_folder(tool, tmp_path, extra, needle):
    """The tool created --output first, so a refused export left an empty folder."""
    from test_export import TINY

    argv = ["--config-file", str(ROOT / "configs/Demo/fine_tiny.yaml"), "--format", "onnx"]
    argv += ["--output", str(tmp_path / "export")]
    opts = ["--opts", *TINY]
    if extra[0] == "--opts":
        opts, extra = opts + extra[1:], []
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + extra + opts)
    message = str(exc.value.code)
    assert message.startswith("error:") and needle in message
    assert not (tmp_path / "export").exists()


def test_verify_fails_on_any_difference_and_marks_the_samples_own_sizes(
    tool, tmp_path, capsys, monkeypatch
):
    """--verify exits with an error when one comparison of several differs from eager, and marks a
    comparison at the sample's own padded size and text length as not unseen (the export's
    comparisons themselves are stood in for: no graph is traced here)."""
    from test_export import TINY

    import fiber_d2.deploy as deploy
    import fiber_d2.deploy.verify as deploy_verify

    monkeypatch.setattr(tool, "export_detector", lambda *a, **k: Path(a[3]) / "model.ts")
    monkeypatch.setattr(deploy, "TorchScriptPredictor", lambda export_dir: None)
    results = []
    monkeypatch.setattr(deploy_verify, "verify_export", lambda *a: [dict(r) for r in results])

    def run(out):
        argv = ["--config-file", str(ROOT / "configs/Demo/fine_tiny.yaml"), "--format"]
        argv += ["torchscript", "--output", str(out), "--prompt", "red circle", "--verify"]
        try:
            return tool.main(argv + ["--opts", *TINY])
        finally:
            printed = capsys.readouterr().out.splitlines()
            run.lines = [json.loads(x) for x in printed if x.startswith("{")]

    results[:] = [{"ok": True, "padded_size": [0, 0], "text_len": 0}]
    assert run(tmp_path / "a") == str(tmp_path / "a" / "model.ts")
    ((line,),) = [run.lines]
    assert line["unseen_size"] and line["unseen_text_len"]
    sample = line["sample"]
    own = {"padded_size": sample["padded_size"], "text_len": sample["text_len"]}
    results[:] = [{"ok": True, **own}, {"ok": False, "padded_size": [0, 0], "text_len": 0}]
    with pytest.raises(SystemExit, match="^error: the torchscript export differs from eager"):
        run(tmp_path / "b")
    assert [(x["unseen_size"], x["unseen_text_len"]) for x in run.lines] == [
        (False, False),
        (True, True),
    ]
