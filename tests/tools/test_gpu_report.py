"""tools/gpu_report.py: its arithmetic, and the whole report run on the CPU at the Demo's size."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "original_fine_tiny"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "tools" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_report = _load()


def test_mfu_is_six_multiply_adds_per_image_over_the_peak():
    # 1e9 multiply-adds forward -> 6e9 training FLOPs per image; 10 images/s on a 1 TFLOP/s device
    assert gpu_report.mfu(10**9, 10.0, 1.0) == pytest.approx(0.06)
    assert gpu_report.mfu(2 * 10**9, 10.0, 1.0) == pytest.approx(0.12)


def test_peak_comes_from_the_flag_or_the_device_name():
    args = argparse.Namespace(peak_tflops=None, amp_dtype="bf16")
    assert gpu_report.peak_tflops(args, "NVIDIA H200") == 989.4
    assert gpu_report.peak_tflops(args, "NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_report.peak_tflops(args, "cpu") is None
    args.amp_dtype = "none"  # fp32: no tensor-core peak in the table
    assert gpu_report.peak_tflops(args, "NVIDIA H200") is None
    args.peak_tflops = 67.0
    assert gpu_report.peak_tflops(args, "NVIDIA H200") == 67.0


def test_unknown_skip_step_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_report.main(["--device", "cpu", "--skip", "train,warp"])
    assert "unknown --skip step(s) ['warp']" in str(e.value)


@pytest.mark.long(2)
def test_report_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "report.md"
    argv = ["--device", "cpu", "--config-file", "configs/Demo/fine_tiny.yaml"]
    argv += ["--height", "128", "--width", "128", "--batch", "1", "--iters", "1", "--warmup", "0"]
    argv += ["--peak-tflops", "1.0", "--names", "24", "--chunk", "8"]
    # the batch search and the parity step have their own tests below
    argv += ["--skip", "search,parity", "--out", str(out)]
    result = gpu_report.main(argv)

    assert [(r["task"], r["batch"]) for r in result["train"]] == [("train", 1)]
    assert [r["batch"] for r in result["inference"]] == [1]
    variants = [r.get("variant") for r in result["lvis"]]
    assert variants == ["reference", "improved", "ratio"]
    assert result["lvis"][0]["chunks"] == 3  # 24 names in chunks of 8
    assert result["macs"] > 0
    assert result["parity"] == "not run"

    table = out.read_text()
    assert table.strip() == result["table"]
    (train_row,) = [line for line in table.splitlines() if line.startswith("| training step")]
    expected = 100 * gpu_report.mfu(result["macs"], result["train"][0]["images_per_s"], 1.0)
    assert train_row.rstrip(" |").endswith(f"{expected:.1f} %")
    assert len([line for line in table.splitlines() if line.startswith("| LVIS-style")]) == 2
    speedup = result["lvis"][2]["speedup"]
    assert f"LVIS-style evaluation speed-up with prefix reuse: {speedup}x" in table


def test_parity_step_reports_a_missing_fixture_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("FIBER_D2_ORIGINAL_FIXTURE", str(tmp_path / "nowhere"))
    args = argparse.Namespace(device="cpu")
    status = gpu_report.run_parity(args)
    assert status.startswith("skipped (original-FIBER fixture not found"), status


@pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"original-FIBER fixture not found at {FIXTURE}")
def test_parity_step_passes_on_the_cpu(monkeypatch):
    monkeypatch.delenv("FIBER_D2_ORIGINAL_FIXTURE", raising=False)
    status = gpu_report.run_parity(argparse.Namespace(device="cpu"))
    assert status.startswith("passed ("), status
    assert "10 passed" in status  # 5 tests x (features off, on)


def _record(task, batch):
    return dict(
        task=task,
        batch=batch,
        height=64,
        width=64,
        dtype="bf16",
        ms_median=10.0,
        images_per_s=batch * 100.0,
        peak_mem_mb=1.0,
        device_name="NVIDIA H200",
    )


def test_failed_benchmark_ends_the_batch_search(monkeypatch):
    calls = []

    def fake_bench(args, task, batch, iters, *extra):
        calls.append((task, batch))
        if batch >= 8:  # "out of memory"
            return []
        return [_record(task, batch)]

    monkeypatch.setattr(gpu_report, "_bench", fake_bench)
    monkeypatch.setattr(sys, "argv", ["gpu_report.py"])
    argv = ["--device", "cpu", "--amp-dtype", "bf16", "--batch", "2", "--max-batch", "64"]
    result = gpu_report.main([*argv, "--skip", "flops,parity,lvis"])
    assert [c for c in calls if c[0] == "train"] == [("train", 2), ("train", 4), ("train", 8)]
    assert [r["batch"] for r in result["train"]] == [2, 4]
    assert result["peak_tflops"] == 989.4  # by the device name and dtype
    assert "largest training batch that ran: 4" in result["table"]


def test_records_are_printed_as_they_come(monkeypatch, capsys):
    """A report stopped part-way (a device's time limit) has printed the figures it took."""

    def fake_bench(args, task, batch, iters, *extra):
        if batch > 2:
            raise KeyboardInterrupt  # the run is stopped during the second measurement
        return [_record(task, batch)]

    monkeypatch.setattr(gpu_report, "_bench", fake_bench)
    with pytest.raises(KeyboardInterrupt):
        gpu_report.main(["--device", "cpu", "--batch", "2", "--skip", "flops,parity,lvis"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [_record("train", 2)]


def test_a_report_that_fails_while_written_keeps_the_previous_one(monkeypatch, tmp_path, capfd):
    """``--out`` is written whole or not at all: a write that fails part-way (here a device name
    the file's encoding cannot hold) leaves the previous report, not a truncated one."""
    out = tmp_path / "report.md"
    out.write_text("previous report\n")

    def fake_bench(args, task, batch, *rest):
        return [dict(_record(task, batch), device_name="NVIDIA H200 \udc80")]

    monkeypatch.setattr(gpu_report, "_bench", fake_bench)
    argv = ["--device", "cpu", "--batch", "2", "--max-batch", "2", "--out", str(out)]
    with pytest.raises(UnicodeEncodeError):
        gpu_report.main([*argv, "--skip", "flops,parity,lvis,inference"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    assert out.read_text() == "previous report\n"


def test_failed_flop_count_leaves_the_mfu_out(monkeypatch, tmp_path, capsys):
    """tools/analyze_model.py failing costs the MFU values, not the report."""
    monkeypatch.setattr(gpu_report, "_bench", lambda args, task, batch, *rest: [_record(task, 2)])
    monkeypatch.setattr(gpu_report, "ANALYZE", tmp_path / "missing.py")
    argv = ["--device", "cpu", "--amp-dtype", "bf16", "--batch", "2", "--max-batch", "2"]
    result = gpu_report.main([*argv, "--skip", "parity,lvis,inference"])
    assert result["macs"] is None
    (train_row,) = [line for line in result["table"].splitlines() if "training step" in line]
    assert train_row.endswith("|  |")  # the MFU column is there (the peak is known), empty
    assert "forward multiply-adds" not in result["table"]
    assert "# flops failed (exit status 2)" in capsys.readouterr().err


def test_bench_commands_inference_batches_and_flop_parsing(monkeypatch):
    """Autocast flags only when a dtype is asked for; evaluation at batch 1 and --batch; the
    multiply-adds read from analyze_model's 'total_flops: N' line."""
    import subprocess

    cmds = []

    def fake_run(cmd, **kwargs):
        cmds.append(cmd)
        out = "noise\ntotal_flops: 123456789.0\n" if str(gpu_report.ANALYZE) in cmd else ""
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(gpu_report.subprocess, "run", fake_run)
    args = gpu_report._parser().parse_args(["--device", "cpu", "--amp-dtype", "none"])
    gpu_report._bench(args, "train", 2, 1)
    assert "--amp" not in cmds[-1] and "--amp-dtype" not in cmds[-1]
    args.amp_dtype = "bf16"
    gpu_report._bench(args, "train", 2, 1)
    assert cmds[-1][cmds[-1].index("--amp-dtype") - 1 :][:2] == ["--amp", "--amp-dtype"]
    assert gpu_report.forward_macs(args) == 123456789

    batches = []
    monkeypatch.setattr(
        gpu_report,
        "_bench",
        lambda args, task, batch, *rest: batches.append((task, batch)) or [_record(task, batch)],
    )
    gpu_report.main(["--device", "cpu", "--batch", "4", "--skip", "train,flops,lvis,parity"])
    assert batches == [("inference", 1), ("inference", 4)]
