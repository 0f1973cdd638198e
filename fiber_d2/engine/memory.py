"""The C allocator's mmap threshold for CPU runs (glibc).

glibc serves an allocation above its mmap threshold with its own ``mmap`` and returns it to the OS
when it is freed; smaller ones come from the heap, where a freed block between live ones stays
resident. The default threshold is dynamic: it starts at 128 KiB and grows with every mmapped block
freed, up to 32 MiB, so after a few iterations most activation and gradient tensors of a FIBER-B
training step land on the heap, and up to 2 GB of the step's peak resident memory at 800 x 1333
holds no tensor. A fixed threshold (``CPU_MMAP_THRESHOLD_MB``) keeps large tensors on ``mmap``; it
changes no result, only where memory comes from, and costs time (every such allocation maps fresh
zeroed pages). Measured on a quiet 2-core CPU, FIBER-B forward + backward at 800 x 1344, 1 thread:
glibc's default 81.1 s / 4,902 MB peak, 8 MiB (the default, training only) 92.5 s / 3,849 MB,
1 MiB 95.0 s / 3,616 MB; inference at 512 x 512 took 1.39x the time with 1 MiB, so ``--eval-only``
and the predictor leave glibc's default (README "Measured figures").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = [
    "set_mmap_threshold",
    "mmap_threshold_mb",
    "apply_mmap_threshold",
    "check_mmap_threshold",
    "MMAP_ENV",
    "MAX_MMAP_THRESHOLD_MB",
]

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc reads it (bytes) at process start
_current_mb: float | None = None
# glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2); mallopt refuses more.
MAX_MMAP_THRESHOLD_MB = 32


def check_mmap_threshold(mib: float, name: str = "CPU_MMAP_THRESHOLD_MB") -> None:
    """Raise ``ValueError`` (naming ``name``) unless 0 <= ``mib`` <= :data:`MAX_MMAP_THRESHOLD_MB`
    (NaN included): a value glibc would refuse is an error, not a silently kept default."""
    if not 0 <= mib <= MAX_MMAP_THRESHOLD_MB:
        raise ValueError(
            f"{name} must be between 0 (glibc's default) and {MAX_MMAP_THRESHOLD_MB} MiB "
            f"(glibc's largest mmap threshold), got {mib}"
        )


def set_mmap_threshold(mib: float) -> None:
    """Serve every allocation of at least ``mib`` MiB by its own ``mmap`` from now on (glibc).

    The same as starting the process with ``MALLOC_MMAP_THRESHOLD_=<bytes>``.

    Raises:
        ValueError: ``mib`` is not positive, or the C library has no ``mallopt`` (not glibc).
    """
    global _current_mb
    if not mib > 0:
        raise ValueError(f"the mmap threshold must be > 0 MiB, got {mib}")
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        raise ValueError(f"a fixed mmap threshold needs glibc's mallopt: {e}") from e
    if mallopt(_M_MMAP_THRESHOLD, int(mib * 2**20)) != 1:
        raise ValueError(f"mallopt refused an mmap threshold of {mib} MiB")
    _current_mb = float(mib)


def mmap_threshold_mb() -> float | None:
    """The fixed mmap threshold of this process in MiB (set here or by the environment), else None
    (glibc's dynamic default)."""
    if _current_mb is not None:
        return _current_mb
    env = os.environ.get(MMAP_ENV, "")
    return round(int(env) / 2**20, 3) if env.isdigit() else None


def apply_mmap_threshold(mib: float) -> float | None:
    """Fix the threshold at ``mib`` MiB (``CPU_MMAP_THRESHOLD_MB``) unless ``mib`` is 0 or the
    environment already fixes it; on a C library without ``mallopt`` log why and go on.

    Returns:
        the threshold in effect (:func:`mmap_threshold_mb`).
    """
    if mib > 0 and os.environ.get(MMAP_ENV) is None:
        try:
            set_mmap_threshold(mib)
        except ValueError as e:
            logger.info("CPU_MMAP_THRESHOLD_MB %s not applied: %s", mib, e)
    return mmap_threshold_mb()
