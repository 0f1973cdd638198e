"""Run a test body in two gloo processes and collect what each rank returns.

Gloo may abort a process (SIGABRT, "terminate called without an active exception") while it tears
its connections down, after all the work is done. So each rank records its result, meets the other
at a barrier, marks itself finished and only then destroys the process group; a rank that died
after marking itself finished is not a failure of the code under test. A rank that raised, hung or
died earlier fails the test with its traceback.
"""

import json
import os
import time
import traceback

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_two_ranks"]


def _entry(rank, fn, init_file, folder, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = fn(rank, *args)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
        open(os.path.join(folder, f"rank{rank}.done"), "w").close()
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_two_ranks(fn, folder, *args, timeout: float = 300.0) -> list:
    """Call ``fn(rank, *args)`` in ranks 0 and 1 of a gloo group; return the two JSON results.

    ``fn`` must be a module-level function (it is pickled into the spawned processes) and return
    something JSON can hold.
    """
    folder = str(folder)
    ctx = mp.spawn(
        _entry, args=(fn, os.path.join(folder, "init"), folder, args), nprocs=2, join=False
    )
    deadline = time.time() + timeout
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.time()))
    hung = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"rank(s) {hung} did not finish within {timeout:.0f} s (left in a collective)")
    # every rank's traceback: one rank's failure often shows in the other as a closed connection
    errors = [
        f"rank {rank} raised:\n{open(path).read()}"
        for rank in range(len(ctx.processes))
        if os.path.exists(path := os.path.join(folder, f"rank{rank}.error"))
    ]
    if errors:
        codes = ", ".join(f"rank {r}: {p.exitcode}" for r, p in enumerate(ctx.processes))
        pytest.fail("\n".join(errors) + f"\nexit codes: {codes}")
    results = []
    for rank, p in enumerate(ctx.processes):
        if not os.path.exists(os.path.join(folder, f"rank{rank}.done")):
            pytest.fail(f"rank {rank} died before finishing (exit code {p.exitcode})")
        with open(os.path.join(folder, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results
