"""Memory and time probes of ``tools/benchmark.py``.

``peak_mem_mb`` spans model construction and the runs: ``torch.cuda.max_memory_allocated`` on a
GPU; on the CPU the growth of the peak resident set size after ``malloc_trim`` (Linux ``VmHWM``,
reset via ``/proc/self/clear_refs`` so each run in a process has its own peak; ``getrusage``
elsewhere). Times are wall-clock milliseconds, synchronised with the GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import re
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = [
    "PeakMemory",
    "SavedTensors",
    "autocast_context",
    "base_record",
    "count_params",
    "median",
    "state_mb",
    "sync",
    "timed",
]


def sync(device: torch.device) -> None:
    """Wait for the queued GPU work of ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in KiB; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+)", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of a span of work in MiB (how it is measured: see the module docstring).

    Args:
        device: where the work runs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._start_kb = 0
        self._hwm = False

    def start(self) -> None:
        """Begin the span (before the model is built)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # hand freed heap pages back to the OS, so that reusing them shows as growth
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            rss = _proc_status_kb("VmRSS")
            self._hwm = rss is not None and _proc_status_kb("VmHWM") is not None
        except OSError:
            self._hwm = False
        self._start_kb = rss if self._hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self) -> float:
        """CUDA max allocated, or CPU peak-RSS growth, since :meth:`start`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._hwm:
            end = _proc_status_kb("VmHWM") or self._start_kb
        else:
            end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return max(end - self._start_kb, 0) / 1024.0

    def current_mb(self) -> float | None:
        """CUDA allocated, or CPU resident-set growth, now; None where unavailable."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        rss = _proc_status_kb("VmRSS") if self._hwm else None
        return None if rss is None else max(rss - self._start_kb, 0) / 1024.0


class SavedTensors(AbstractContextManager):
    """Bytes of the tensors autograd saves for the backward pass inside the context (each storage
    once; parameters excluded), e.g. the activations a training forward keeps.

    Args:
        model: the module whose parameters are not counted.
    """

    def __init__(self, model: torch.nn.Module):
        self._skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._skip:
            self._sizes.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    def __enter__(self) -> SavedTensors:
        self._sizes.clear()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def mb(self) -> float:
        """MiB saved during the last ``with`` block."""
        return sum(self._sizes.values()) / 2**20


def timed(fn: Callable[[], dict | None], device: torch.device, iters: int, warmup: int) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed.

    Returns:
        ``{"total": [ms per call], <phase>: [ms]}`` with the phase durations ``fn`` returns.
    """
    for _ in range(warmup):
        fn()
    times: dict[str, list[float]] = {"total": []}
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        phases = fn() or {}
        sync(device)
        times["total"].append((time.perf_counter() - start) * 1000.0)
        for k, v in phases.items():
            times.setdefault(k, []).append(v)
    return times


def median(values: list[float]) -> float:
    """Median of ``values`` (ms), rounded to 0.01."""
    return round(statistics.median(values), 2)


def autocast_context(
    device: torch.device, args: argparse.Namespace
) -> tuple[AbstractContextManager, str]:
    """(autocast context, dtype name) for ``--amp`` / ``--amp-dtype``."""
    if not (args.amp or args.amp_dtype):
        return nullcontext(), "float32"
    amp = args.amp_dtype or ("fp16" if device.type == "cuda" else "bf16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp-dtype fp16 needs --device cuda; use bf16 on the CPU")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype), str(dtype).replace("torch.", "")


def count_params(model: torch.nn.Module, trainable: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` when ``trainable``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def base_record(
    size: tuple[int, int], dtype: str, ms: list[float], memory: PeakMemory, model
) -> dict:
    """The keys every task reports: ``height``, ``width`` (``size``), ``dtype``, ``ms_median`` (of
    ``ms``), ``peak_mem_mb`` (of ``memory``) and ``params`` (all of ``model``'s)."""
    h, w, mb = size[0], size[1], round(memory.peak_mb(), 1)
    record = dict(height=h, width=w, dtype=dtype, ms_median=median(ms), peak_mem_mb=mb)
    return {**record, "params": count_params(model)}


def state_mb(state: dict[str, torch.Tensor]) -> float:
    """Size of a state dict's tensors in MiB (None entries count 0)."""
    return sum(t.numel() * t.element_size() for t in state.values() if t is not None) / 2**20
