"""A process that ends (SIGKILL) when its parent does: :func:`end_with_parent` for the workers of a
multi-process run and a pipeline's ``train_net.py`` stages (:mod:`fiber_d2.engine.cli`), and, run as
a script, the step between a tool and a measuring child that does not call it itself
(:func:`fiber_d2.engine.cli.run_tied`)::

    python parent_death.py PARENT_PID PROGRAM [ARGS...]

asks for the signal (Linux; it survives ``exec``), leaves if ``PARENT_PID`` is no longer its parent,
then becomes ``PROGRAM``. Standard library only, so that the script costs milliseconds.
"""

from __future__ import annotations

import os
import sys

__all__ = ["end_with_parent"]


def end_with_parent(parent_pid: int) -> None:
    """End this process (SIGKILL) when its parent ``parent_pid`` ends.

    For the workers of a multi-process run and the stages a pipeline runs (:func:`run_child`).
    detectron2's ``launch`` ends the other workers when one dies. torch's spawn asks the kernel for
    SIGINT when the launcher dies, but a worker ignores SIGINT when its launcher was started in the
    background by a shell script (``train_net.py ... &`` starts with SIGINT ignored, inherited), and
    a worker blocked in a collective would not act on it. So a launcher or pipeline killed with
    SIGKILL (``kill -9``, the OOM killer) left its children training on, writing checkpoints into
    ``OUTPUT_DIR`` beside the run that ``--resume`` then started. Linux: ``PR_SET_PDEATHSIG`` with
    SIGKILL, in place of torch's SIGINT; elsewhere a daemon thread that polls the parent's pid.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was asked for
        os._exit(1)


def _exec_tied(argv: list[str]) -> None:
    parent = int(argv[0])
    if sys.platform.startswith("linux"):
        end_with_parent(parent)
    elif (
        os.getppid() != parent
    ):  # elsewhere no signal, and a watching thread would not outlive exec
        os._exit(1)
    os.execv(argv[1], argv[1:])


if __name__ == "__main__":
    _exec_tied(sys.argv[1:])
