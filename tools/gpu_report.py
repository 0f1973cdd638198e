#!/usr/bin/env python
"""The accelerator figures of the README in one command: FIBER-B's training step under autocast at
800 x 1333 (batch 2 and the largest batch that fits), images/s, peak memory and model FLOPs
utilisation (MFU); evaluation images/s; LVIS-style per-image evaluation with and without prefix
reuse; and the device path's parity with the original implementation on identical weights.

    python tools/gpu_report.py [--config-file configs/FIBER-B/coco.yaml] [--device cuda]
        [--batch 2] [--max-batch 32] [--peak-tflops 989.4] [--skip parity,lvis] [--out report.md]
        [KEY VALUE ...]

Every measurement is a ``tools/benchmark.py`` run in a fresh process (so each has its own peak
memory, and an out-of-memory batch ends only its own process), and the script prints each record as
a JSON line as soon as it has it (a report stopped part-way keeps what it has measured), then a
markdown table (also written to ``--out``):

* ``train``: one full training iteration (forward, losses, backward, optimizer step) under autocast
  (``--amp-dtype``, default bf16) at ``--batch`` images, then at twice that, four times, ... up to
  ``--max-batch``; the search stops at the first batch that fails (out of memory). Fewer timed
  iterations in the search (``--search-iters``).
* ``flops``: ``tools/analyze_model.py --tasks flop`` at the same size: N multiply-adds for one
  image's forward pass (with a full-length text). A training image then costs about 3 x 2N FLOPs
  (one multiply-add = 2 FLOPs; the backward pass about twice the forward), and
  MFU = 6N x images/s / peak FLOP/s, with the peak from ``--peak-tflops`` or, by the device's name,
  from :data:`PEAK_TFLOPS` (dense, for the autocast dtype). Without a known peak the MFU column is
  left out. This is the usual estimate: it ignores the frozen parameters' missing weight gradients
  and counts the text at ``MAX_QUERY_LEN``.
* ``inference``: ``model.eval()`` forward under autocast at batch 1 and ``--batch``.
* ``lvis``: one image with ``--names`` category names in chunks of ``--chunk`` (LVIS: 1203 in 31
  chunks of 40) under autocast, with prefix reuse and the other performance features off and on
  (``benchmark.py --reference``): both times and their ratio.
* ``parity``: ``tests/checkpoint/test_original_parity.py`` on ``--device`` in fp32 with TF32 off:
  the original implementation's own outputs for a tiny FIBER (``../shared/fixtures`` next to the
  checkout, or ``$FIBER_D2_ORIGINAL_FIXTURE``) against fiber_d2 on converted weights, every tensor at
  1e-4, with the performance features on and off. Only the CPU path is checked by the test suite;
  this runs the same test on the accelerator (torchvision's deformable convolution, fused attention
  kernels). Reported as passed / failed / skipped (no fixture).

``--skip`` leaves out steps (comma-separated: train, search, flops, inference, lvis, parity).
``--device cpu`` runs the same report on the CPU (useful to check the script; no autocast unless
``--amp-dtype bf16`` is asked for). Needs the environment of ``make test``, with a CUDA build of
PyTorch for ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "tools" / "benchmark.py"
ANALYZE = ROOT / "tools" / "analyze_model.py"
PARITY_TEST = ROOT / "tests" / "checkpoint" / "test_original_parity.py"
STEPS = ("train", "search", "flops", "inference", "lvis", "parity")

# Dense tensor-core peak in TFLOP/s for bf16 and fp16 (the same for both on these chips), by
# device-name fragment (vendor data sheets; SXM parts). Pass --peak-tflops for any other device.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` of one measuring step, which ends with this report: a report killed
    mid-step left its child on the device, beside the steps of its rerun."""
    from fiber_d2.engine.cli import run_tied

    return run_tied(cmd, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", default="configs/FIBER-B/coco.yaml")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--height", type=int, default=None, help="image height (config's by default)")
    p.add_argument("--width", type=int, default=None, help="image width (config's by default)")
    p.add_argument("--batch", type=int, default=2, help="training / inference batch")
    p.add_argument("--max-batch", type=int, default=32, help="largest training batch to try")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before them")
    p.add_argument("--search-iters", type=int, default=2, help="timed iterations in the search")
    p.add_argument(
        "--amp-dtype",
        choices=["bf16", "fp16", "none"],
        default=None,
        help="autocast dtype (default: bf16 on cuda, none on cpu)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for the autocast dtype (MFU)",
    )
    p.add_argument("--names", type=int, default=1203, help="lvis: vocabulary size")
    p.add_argument("--chunk", type=int, default=40, help="lvis: names per prompt chunk")
    p.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {STEPS}")
    p.add_argument("--out", default="", help="also write the markdown table here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def _size_flags(args: argparse.Namespace) -> list[str]:
    """--height / --width as given (none: the config's test size)."""
    flags = ["--height", str(args.height)] if args.height else []
    return flags + (["--width", str(args.width)] if args.width else [])


def _bench(args: argparse.Namespace, task: str, batch: int, iters: int, *extra: str) -> list[dict]:
    """Run one ``tools/benchmark.py`` command in a fresh process; its JSON records (empty when the
    process failed, e.g. out of memory)."""
    cmd = [sys.executable, str(BENCHMARK), "--config-file", args.config_file, "--task", task]
    cmd += ["--device", args.device, "--batch", str(batch), "--iters", str(iters)]
    cmd += ["--warmup", str(args.warmup), *_size_flags(args)]
    if args.amp_dtype != "none":
        cmd += ["--amp", "--amp-dtype", args.amp_dtype]
    cmd += [*extra, *args.opts]
    print("# " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    proc = _run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"# failed (exit status {proc.returncode}): {tail}", file=sys.stderr, flush=True)
        return []
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def forward_macs(args: argparse.Namespace) -> int | None:
    """Multiply-adds of one image's forward pass (``tools/analyze_model.py --tasks flop``); None,
    with a line on stderr, when that fails (the report then has no MFU column values)."""
    cmd = [sys.executable, str(ANALYZE), "--config-file", args.config_file, "--tasks", "flop"]
    cmd += [*_size_flags(args), *args.opts]
    print("# " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    proc = _run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    match = re.search(r"^total_flops: ([0-9.]+)$", proc.stdout, re.M)
    if proc.returncode != 0 or match is None:
        tail = (proc.stderr.strip().splitlines() or ["printed no 'total_flops: N' line"])[-1]
        print(
            f"# flops failed (exit status {proc.returncode}): {tail}", file=sys.stderr, flush=True
        )
        return None
    return int(float(match.group(1)))


def _printed(records: list[dict]) -> list[dict]:
    """``records``, each printed as a JSON line at once: a report stopped part-way (a device's time
    limit) keeps the figures it has taken."""
    for r in records:
        print(json.dumps(r), flush=True)
    return records


def mfu(macs: int, images_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of a training step: 6 x multiply-adds per image x images/s / peak."""
    return 6.0 * macs * images_per_s / (peak_tflops * 1e12)


def peak_tflops(args: argparse.Namespace, device_name: str) -> float | None:
    """--peak-tflops, else the :data:`PEAK_TFLOPS` entry matching the device name and dtype."""
    if args.peak_tflops:
        return args.peak_tflops
    if args.amp_dtype not in ("bf16", "fp16"):
        return None  # fp32: no tensor-core peak in the table
    return next((v for name, v in PEAK_TFLOPS.items() if name in device_name), None)


def run_parity(args: argparse.Namespace) -> str:
    """The original-parity test on ``args.device``: 'passed', 'failed' or 'skipped (reason)'."""
    env = dict(os.environ, FIBER_D2_TEST_DEVICE=args.device)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(PARITY_TEST)]
    print("# FIBER_D2_TEST_DEVICE=" + args.device + " " + " ".join(cmd[1:]), file=sys.stderr)
    proc = _run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0 and " passed" in summary:
        return f"passed ({summary.strip('= ')})"
    if proc.returncode in (0, 5) and "skipped" in summary:
        reason = re.search(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", proc.stdout)
        return f"skipped ({reason.group(1) if reason else summary.strip('= ')})"
    print(proc.stdout, file=sys.stderr)
    return f"failed ({summary.strip('= ')})"


def _row(what: str, r: dict, macs: int | None, peak: float | None, train: bool) -> str:
    size = f"{r['height']}x{r['width']}"
    cells = [what, f"{r['batch']} x {size}", r["dtype"], f"{r['ms_median']:.1f}"]
    cells += [f"{r['images_per_s']:.2f}", f"{r['peak_mem_mb']:.0f}"]
    if peak:
        cells.append(f"{100 * mfu(macs, r['images_per_s'], peak):.1f} %" if train and macs else "")
    return "| " + " | ".join(cells) + " |"


def report(args: argparse.Namespace) -> dict:
    """Run the steps; print the JSON records and the markdown table; return everything."""
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STEPS)
    if unknown:
        sys.exit(f"error: unknown --skip step(s) {sorted(unknown)}; steps: {', '.join(STEPS)}")
    if args.amp_dtype is None:
        args.amp_dtype = "bf16" if args.device == "cuda" else "none"
    out: dict = {"train": [], "inference": [], "lvis": [], "macs": None, "parity": "not run"}
    if "train" not in skip:
        out["train"] += _printed(_bench(args, "train", args.batch, args.iters))
        batch = args.batch * 2
        while "search" not in skip and out["train"] and batch <= args.max_batch:
            records = _printed(_bench(args, "train", batch, args.search_iters))
            if not records:
                break
            out["train"] += records
            batch *= 2
    if "flops" not in skip:
        out["macs"] = forward_macs(args)
    if "inference" not in skip:
        for batch in sorted({1, args.batch}):
            out["inference"] += _printed(_bench(args, "inference", batch, args.iters))
    if "lvis" not in skip:
        extra = ("--names", str(args.names), "--chunk", str(args.chunk), "--reference")
        out["lvis"] = _printed(_bench(args, "lvis-eval", 1, max(1, args.iters // 2), *extra))
    if "parity" not in skip:
        out["parity"] = run_parity(args)
    records = out["train"] + out["inference"] + out["lvis"]
    device_name = next((r["device_name"] for r in records if "device_name" in r), args.device)
    peak = peak_tflops(args, device_name)
    lines = [f"{device_name}, `{args.config_file}`, autocast {args.amp_dtype}", ""]
    head = ["measurement", "batch x size", "dtype", "ms", "images/s", "peak MB"]
    head += [f"MFU (peak {peak:g} TFLOP/s)"] if peak else []
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in out["train"]:
        lines.append(_row("training step", r, out["macs"], peak, True))
    for r in out["inference"]:
        lines.append(_row("evaluation", r, out["macs"], peak, False))
    for r in out["lvis"]:
        if r.get("variant") in ("reference", "improved"):
            what = "LVIS-style eval, prefix reuse " + (
                "off" if r["variant"] == "reference" else "on"
            )
            lines.append(
                _row(f"{what} ({r['names']} names, {r['chunks']} chunks)", r, None, peak, False)
            )
    ratio = [r for r in out["lvis"] if r.get("variant") == "ratio"]
    lines.append("")
    if ratio:
        lines.append(f"LVIS-style evaluation speed-up with prefix reuse: {ratio[0]['speedup']}x")
    if out["macs"]:
        lines.append(
            f"forward multiply-adds per image: {out['macs']:,} (training: 6x that in FLOPs)"
        )
    lines.append(f"parity with the original implementation on {args.device}: {out['parity']}")
    if len(out["train"]) and "search" not in skip:
        lines.append(f"largest training batch that ran: {out['train'][-1]['batch']}")
    table = "\n".join(lines)
    print(table, flush=True)
    if args.out:
        from fiber_d2.checkpoint.safe_io import write_whole  # a kill mid-write leaves no half file

        with write_whole(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    out.update(table=table, peak_tflops=peak, device_name=device_name)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if os.path.isfile(args.config_file):  # relative to the working directory; else to the checkout
        args.config_file = os.path.abspath(args.config_file)
    if min(args.batch, args.max_batch, args.iters, args.search_iters) < 1 or args.warmup < 0:
        sys.exit("error: need --batch, --max-batch, --iters, --search-iters >= 1, --warmup >= 0")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit(
                "error: --device cuda: no CUDA device is available (--device cpu runs on the CPU)"
            )
    return report(args)


if __name__ == "__main__":
    main()
