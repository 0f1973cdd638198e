"""One training stage run twice, uninterrupted and killed then resumed, and the two finals compared:
the exact-resume tests of the trainer (one and two processes) and of the projects."""

import os
from collections.abc import Callable

import torch
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng


class Interrupt(Exception):
    pass


class KillAt(HookBase):
    """Stop the run right after iteration ``at`` (like a SIGKILL between two iterations)."""

    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise Interrupt


def finals_that_differ(build: Callable[[str], DefaultTrainer], folder) -> list[str]:
    """Train ``build(output_dir)`` (6 iterations, a checkpoint every 3) in ``folder/whole``, then in
    ``folder/killed`` killed after iteration 4 and resumed from its checkpoint of 2 in a process
    seeded otherwise (each process as detectron2's ``default_setup`` seeds it: seed + rank). The
    names of the weights that differ between the two ``model_final.pth`` (on the main process; []
    on the others)."""

    def run(out, seed, resume=False, kill=False):
        seed_all_rng(seed + comm.get_rank())
        trainer = build(os.path.join(folder, out))
        if kill:
            trainer.register_hooks([KillAt(4)])
        trainer.resume_or_load(resume=resume)
        try:
            trainer.train()
        except Interrupt:
            if not kill:
                raise
        else:
            assert not kill, "the run was not killed"
        comm.synchronize()

    run("whole", 0)
    run("killed", 0, kill=True)
    run("killed", 1, resume=True)
    if not comm.is_main_process():
        return []
    whole, resumed = (
        torch.load(os.path.join(folder, d, "model_final.pth"), weights_only=True)["model"]
        for d in ("whole", "killed")
    )
    assert whole.keys() == resumed.keys()
    return [k for k, v in whole.items() if not torch.equal(v, resumed[k])]
