"""Suite-wide settings: one intra-op thread per process, the longest tests first.

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


def pytest_collection_modifyitems(config, items):
    """Start the tests marked ``long`` first, longest first (``@pytest.mark.long(minutes)``, minutes
    on a 2-core CPU). ``make test`` runs the suite in one worker per core, and workers take tests in
    this order: a four-minute test taken last would run alone while the other workers stand idle."""

    def minutes(item):
        mark = item.get_closest_marker("long")
        return mark.args[0] if mark and mark.args else (1.0 if mark else 0.0)

    items.sort(key=minutes, reverse=True)  # stable: the rest keep their collection order
