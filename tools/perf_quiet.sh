#!/usr/bin/env bash
# Re-run every README "Performance features" row that has a time figure, one after the other, on a
# QUIET machine (nothing else running), and print their JSON lines (three per row with --reference:
# features off, features on, their ratio). FIBER-B, random init, fp32, batch 1, 1 thread.
#
#   bash tools/perf_quiet.sh              # all rows, about 22 min on a quiet 2-core CPU (README)
#   bash tools/perf_quiet.sh > perf.jsonl # keep the records
#
# Rows: training forward + backward (--task train-fwd-bwd, the setting of the original comparison;
# glibc mmap threshold at CPU_MMAP_THRESHOLD_MB, as train_net) at 800x1333 and 512x512;
# inference at 800x1333 and 512x512; LVIS-style evaluation of one 800x1333 image with 1203 names in
# 31 chunks of 40. Environment: PYTHON (default .venv/bin/python). Extra arguments go to every
# command (e.g. KEY VALUE config overrides at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
bench() {
    echo "# tools/benchmark.py $*" >&2
    "$PYTHON" tools/benchmark.py --config-file configs/FIBER-B/coco.yaml --iters 1 --warmup 0 \
        --threads 1 --reference "$@"
}
bench --task train-fwd-bwd "$@"
bench --task train-fwd-bwd --height 512 --width 512 "$@"
bench --task inference "$@"
bench --task inference --height 512 --width 512 "$@"
bench --task lvis-eval --names 1203 --chunk 40 "$@"
