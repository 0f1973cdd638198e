"""Suite-wide settings: one intra-op thread per process.

The suite runs on 2-core machines and several tests start worker processes (gloo DDP, evaluator
gathers); with the default thread count, OpenMP threads of concurrent processes oversubscribe the cores
and slow each other down by an order of magnitude. Set before torch is imported, so spawned children
inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread settings above)

# Also when OMP_NUM_THREADS was set otherwise: on a shared 2-core machine two intra-op threads
# spin-wait and some tests ran ~40x slower.
torch.set_num_threads(1)
