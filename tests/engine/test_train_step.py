"""FIBER's training step: gradient accumulation (``SOLVER.IMS_PER_DEVICE``: pass counts, one
optimiser step over several passes equal to one step over the whole batch, DDP, FIBERTrainer's loader
and coarse queue) and skipped batches (no optimiser, LR-scheduler or EMA step; DDP)."""

import warnings

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils.events import EventStorage
from two_ranks import run_two_ranks

from fiber_d2.config import add_fiber_config
from fiber_d2.engine.setup import ConfigError, load_config, validate_config
from fiber_d2.engine.train_step import (
    AMPStepTrainer,
    StepTrainer,
    accumulation_steps,
    with_fiber_step,
)
from fiber_d2.engine.trainer import FIBERTrainer


def _solver(batch, per_device):
    cfg = get_cfg()
    add_fiber_config(cfg)
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.IMS_PER_DEVICE = batch, per_device
    return cfg


@pytest.mark.parametrize(
    "batch, per_device, world, passes",
    [
        (4096, 8, 64, 8),  # the original pre-training: 64 GPUs x 8 x 8 steps
        (4096, 8, 8, 64),
        (512, 8, 8, 8),  # VQAv2
        (1024, 128, 8, 1),  # ITC fine-tuning: no accumulation
        (1024, 128, 2, 4),
        (4096, 8, 1024, 1),  # 4 per process already fit in one pass
        (4096, 0, 1, 1),  # off
    ],
)
def test_accumulation_steps(batch, per_device, world, passes):
    assert accumulation_steps(_solver(batch, per_device), world) == passes


def test_accumulation_steps_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^SOLVER.IMS_PER_BATCH 100 over 1 process\(es\) gives "
                       r"100 per process, not a multiple of SOLVER.IMS_PER_DEVICE 8$"):  # fmt: skip
        accumulation_steps(_solver(100, 8), 1)
    with pytest.raises(ConfigError, match="SOLVER.IMS_PER_DEVICE must be 0"):
        accumulation_steps(_solver(8, -1), 1)
    cfg = load_config(
        "configs/Demo/coarse_tiny.yaml",
        ["SOLVER.IMS_PER_BATCH", "6", "SOLVER.IMS_PER_DEVICE", "4", "DATASETS.TEST", "()"],
    )
    with pytest.raises(ConfigError, match="not a multiple of SOLVER.IMS_PER_DEVICE 4"):
        validate_config(cfg, training=True)
    validate_config(cfg, training=False)  # evaluation takes no passes


class _Toy(torch.nn.Module):
    """Two losses, each a mean over the pass's samples (as FIBER's losses are over a batch)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, batch):
        x = torch.stack([s[0] for s in batch])
        y = torch.stack([s[1] for s in batch])
        pred = self.linear(x).squeeze(1)
        return {"loss_mse": ((pred - y) ** 2).mean(), "loss_l1": 0.5 * (pred - y).abs().mean()}


def _samples(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, generator=g), torch.randn((), generator=g)) for _ in range(n)]


class _Loader:
    """Endless batches of ``size`` over ``samples`` in order; counts the batches drawn."""

    def __init__(self, samples, size):
        self.samples, self.size, self.drawn = samples, size, 0

    def __iter__(self):
        while True:
            start = (self.drawn * self.size) % len(self.samples)
            self.drawn += 1
            yield self.samples[start : start + self.size]


def _one_step(trainer):
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.storage = storage
        trainer.run_step()
        # detectron2 logs on the main process only
        logged = {k: storage.history(k).latest() for k in storage.histories()}
    return [p.detach().clone() for p in trainer.model.parameters()], logged


@pytest.mark.parametrize("amp", [False, True])
def test_accumulated_passes_take_the_step_of_the_whole_batch(amp):
    """On the CPU autocast("cuda") and the gradient scaler are off, so the AMP variant's passes
    must give the fp32 step too (detectron2's AMPTrainer itself refuses to run there)."""
    if amp and torch.cuda.is_available():
        pytest.skip("the scaler is live on CUDA; the CPU run checks the passes' arithmetic")
    samples = _samples(8)
    base = AMPTrainer if amp else SimpleTrainer
    with warnings.catch_warnings():  # the CPU disables autocast("cuda") and the grad scaler
        warnings.simplefilter("ignore")
        model = _Toy()
        whole = SimpleTrainer(
            model, _Loader(samples, 8), torch.optim.SGD(model.parameters(), lr=0.5)
        )
        expected, expected_logged = _one_step(whole)

        model = _Toy()
        loader = _Loader(samples, 2)
        trainer = with_fiber_step(
            base(model, loader, torch.optim.SGD(model.parameters(), lr=0.5)), 4
        )
        assert type(trainer) is (AMPStepTrainer if amp else StepTrainer)
        got, logged = _one_step(trainer)
    assert loader.drawn == 4  # one iteration took the 4 passes
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    assert logged["loss_mse"] == pytest.approx(expected_logged["loss_mse"], rel=1e-6)
    assert logged["loss_l1"] == pytest.approx(
        expected_logged["loss_l1"], rel=1e-6
    )  # the mean over the passes
    moved = [p.detach() for p in _Toy().parameters()]
    assert any(not torch.equal(g, m) for g, m in zip(got, moved))


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_amp_clipping_sees_unscaled_gradients_with_a_fused_optimizer(optimizer):
    """Full-model clipping at norm 1 under a live gradient scaler (2^16; the CPU's GradScaler):
    a fused optimizer takes the same step as the for-loop one, with the clipped gradients at their
    true norm (3.23 here, so clipped to 1). A fused optimizer unscales inside its kernel, so
    without the trainer's unscale the clip saw 65,536 x the norm and the step shrank to 1 / 65,536.
    """
    from fiber_d2.engine.optimizer import _with_full_model_clipping

    def step(fused):
        model = _Toy()
        clipped = _with_full_model_clipping(optimizer, 1.0)
        opt = clipped(model.parameters(), lr=0.1, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        with warnings.catch_warnings():  # the CPU disables autocast("cuda")
            warnings.simplefilter("ignore")
            trainer = AMPStepTrainer(model, _Loader(_samples(8), 8), opt, grad_scaler=scaler)
            params, _ = _one_step(trainer)
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        return params, norm

    loop, loop_norm = step(False)
    fused, fused_norm = step(True)
    assert loop_norm.item() == pytest.approx(1.0, rel=1e-5)  # clipped, unscaled
    assert fused_norm.item() == pytest.approx(loop_norm.item(), rel=1e-5)
    for f, e in zip(fused, loop):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)


def test_a_nonfinite_loss_under_amp_is_skipped_by_the_scaler_and_the_run_goes_on():
    """The original's AMP trainer goes on past a NaN / infinite loss; so does the AMP step (a live
    CPU GradScaler): that iteration leaves the weights as they were, halves the scale and is
    counted, and the next one trains. ``max_nonfinite_in_a_row`` of them stop the run; without AMP
    the first one does, as in detectron2."""
    bad = [(torch.randn(3), torch.tensor(float("inf")))] * 8
    good = _samples(8)

    def trainer(amp, samples, max_in_a_row=100):
        model = _Toy()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loader = _Loader(samples, 8)
        if not amp:
            return StepTrainer(model, loader, opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        t = AMPStepTrainer(model, loader, opt, grad_scaler=scaler)
        t.max_nonfinite_in_a_row = max_in_a_row
        return t

    with warnings.catch_warnings():  # the CPU disables autocast("cuda")
        warnings.simplefilter("ignore")
        t = trainer(True, bad + good)
        start = [p.detach().clone() for p in t.model.parameters()]
        after_bad, _ = _one_step(t)
        assert t.nonfinite_steps == 1 and t.grad_scaler.get_scale() == 2.0**15
        assert all(torch.equal(a, b) for a, b in zip(after_bad, start))
        after_good, logged = _one_step(t)
        assert any(not torch.equal(a, b) for a, b in zip(after_good, start))
        assert t.nonfinite_steps == 1 and t._nonfinite_in_a_row == 0
        assert torch.isfinite(torch.tensor(logged["total_loss"]))

        t = trainer(True, bad, max_in_a_row=2)
        _one_step(t)
        with pytest.raises(FloatingPointError, match="not finite for 2 iterations in a row"):
            _one_step(t)
        with pytest.raises(FloatingPointError):
            _one_step(trainer(False, bad))


def _ddp_step(rank):
    """Each rank: 2 passes of 2 of its own 4 samples, DDP; the reference is one step over all 8."""
    from torch.nn.parallel import DistributedDataParallel

    samples = _samples(8)
    model = DistributedDataParallel(_Toy())
    mine = samples[4 * rank : 4 * rank + 4]
    trainer = StepTrainer(model, _Loader(mine, 2), torch.optim.SGD(model.parameters(), lr=0.5), 2)
    got, _ = _one_step(trainer)
    ref = _Toy()
    whole = SimpleTrainer(ref, _Loader(samples, 8), torch.optim.SGD(ref.parameters(), lr=0.5))
    expected, _ = _one_step(whole)
    return [float((g - e).abs().max()) for g, e in zip(got, expected)]


@pytest.mark.long(0.3)
def test_accumulation_under_ddp_matches_the_global_batch(tmp_path):
    for rank, diffs in enumerate(run_two_ranks(_ddp_step, tmp_path)):
        assert max(diffs) < 1e-6, f"rank {rank}: {diffs}"


def test_fiber_trainer_takes_passes_of_ims_per_device(tmp_path):
    """Demo coarse stage, 4 images per iteration in passes of 2: the loader batches 2, and one
    iteration runs both passes (the ITC queue takes 4 features) with one optimiser step."""
    opts = [
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.IMS_PER_DEVICE", "2", "SOLVER.MAX_ITER", "1",
        "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.IMAGE_SIZE", "64", "MODEL.SWIN.WINDOW_SIZE", "2", "OUTPUT_DIR", str(tmp_path),
    ]  # fmt: skip
    cfg = load_config("configs/Demo/coarse_tiny.yaml", opts)
    cfg.freeze()
    trainer = FIBERTrainer(cfg)
    assert isinstance(trainer._trainer, StepTrainer)
    assert trainer._trainer.accumulation_steps == 2
    assert len(next(iter(trainer._trainer.data_loader))) == 2
    steps = []
    optimizer = trainer._trainer.optimizer
    original_step = optimizer.step
    optimizer.step = lambda *a, **k: steps.append(1) or original_step(*a, **k)
    trainer.train()
    assert trainer.iter == 1 and len(steps) == 1
    assert int(trainer.model.queue.queue_total) == 4


class _SkipToy(_Toy):
    """Sets ``batch_skipped`` as FIBER does when a sample of the pass says so (its 3rd field)."""

    def forward(self, batch):
        self.batch_skipped = any(bool(s[2]) for s in batch)
        losses = super().forward([s[:2] for s in batch])
        return {k: v * 0.0 for k, v in losses.items()} if self.batch_skipped else losses


def _flagged(n, skip_at=(), seed=1):
    return [(x, y, i in skip_at) for i, (x, y) in enumerate(_samples(n, seed))]


@pytest.mark.parametrize("skip_at", [1, 3], ids=["first_pass", "last_pass"])
def test_a_skipped_batch_takes_no_optimiser_step(skip_at):
    model = _SkipToy()
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    # passes of 2: one of the first step's passes holds a skipped sample, the second step none
    trainer = StepTrainer(model, _Loader(_flagged(8, skip_at=(skip_at,)), 2), optimizer, 2)
    got, logged = _one_step(trainer)
    assert trainer.step_skipped and trainer.skipped_steps == 1
    assert all(torch.equal(g, s) for g, s in zip(got, start))  # no momentum, no weight decay
    assert not optimizer.state  # AdamW never stepped
    assert logged == {"skipped_steps": 1}  # the zeroed losses are not logged
    got, logged = _one_step(trainer)
    assert not trainer.step_skipped and trainer.skipped_steps == 1
    assert any(not torch.equal(g, s) for g, s in zip(got, start))
    assert "loss_mse" in logged


def test_the_count_of_skipped_steps_is_resumed():
    """The checkpoint carries the ``skipped_steps`` count, so the metric of a resumed run goes on
    from it; a checkpoint of detectron2's trainer (no count) resumes at 0."""
    model = _SkipToy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    trainer = StepTrainer(model, _Loader(_flagged(8, skip_at=(1,)), 2), optimizer, 2)
    _one_step(trainer)
    saved = trainer.state_dict()
    resumed = StepTrainer(model, _Loader(_flagged(8, skip_at=(1,)), 2), optimizer, 2)
    resumed.load_state_dict(saved)
    assert resumed.skipped_steps == 1
    _, logged = _one_step(resumed)
    assert logged == {"skipped_steps": 2}
    del saved["steps_without_update"]
    resumed.load_state_dict(saved)
    assert resumed.skipped_steps == 0


def _ddp_skip(rank):
    """Rank 0's batch is skipped, rank 1's is not: neither process steps."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_SkipToy())
    start = [p.detach().clone() for p in model.parameters()]
    samples = _flagged(4, skip_at=(0,) if rank == 0 else ())
    trainer = StepTrainer(
        model, _Loader(samples, 2), torch.optim.SGD(model.parameters(), lr=0.5), 1
    )
    got, _ = _one_step(trainer)
    return {
        "skipped": trainer.step_skipped,
        "moved": any(not torch.equal(g, s) for g, s in zip(got, start)),
    }


@pytest.mark.long(0.3)
def test_a_batch_skipped_on_one_process_is_skipped_on_all(tmp_path):
    for rank, result in enumerate(run_two_ranks(_ddp_skip, tmp_path)):
        assert result == {"skipped": True, "moved": False}, f"rank {rank}: {result}"


NO_BOXES = "train_step_test_no_boxes"  # shapes images with their boxes removed
if NO_BOXES not in DatasetCatalog.list():
    DatasetCatalog.register(
        NO_BOXES,
        lambda: [dict(r, annotations=[]) for r in DatasetCatalog.get("shapes_train_det")[:4]],
    )
    _meta = MetadataCatalog.get("shapes_train_det").as_dict()
    _meta.pop("name")
    MetadataCatalog.get(NO_BOXES).set(**_meta)


def test_fiber_trainer_skips_batches_without_boxes_entirely(tmp_path):
    """The Demo detector on images without boxes (every batch skipped, as FIBER skips it): the
    iterations run, but no optimiser, LR-scheduler or EMA step is taken, and the weight-decay
    schedule, which counts the LR scheduler's steps, does not move either."""
    opts = [
        "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.EMA.ENABLED", "True", "DATASETS.TRAIN", f"('{NO_BOXES}',)",
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "DATASETS.TEST", "()",
        "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path),
        # x0.1 weight decay from step 0.5 x 1: iteration 1 passes it, the scheduler's count (0) not
        "SOLVER.WEIGHT_DECAY_SCHEDULE", "True", "SOLVER.STEPS", "(1,)",
        "SOLVER.WEIGHT_DECAY_SCHEDULE_RATIO", "0.5",
    ]  # fmt: skip
    cfg = load_config("configs/Demo/fine_tiny.yaml", opts)
    cfg.freeze()
    trainer = FIBERTrainer(cfg)
    assert isinstance(trainer._trainer, StepTrainer) and trainer._trainer.accumulation_steps == 1
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # an average away from the weights, as a resumed run restores it: an update would move it
    for v in trainer.ema.state.values():
        if v.dtype.is_floating_point:
            v.zero_()
    trainer.ema.restored = True
    ema_start = {k: v.clone() for k, v in trainer.ema.state.items()}
    trainer.train()
    assert trainer.iter == 2 and trainer._trainer.skipped_steps == 2
    assert all(torch.equal(v, start[k]) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(v, ema_start[k]) for k, v in trainer.ema.state.items())
    assert trainer.scheduler.last_epoch == 0  # the LR schedule waits, as FIBER's
    groups = trainer.optimizer.param_groups
    assert any(g["initial_weight_decay"] > 0 for g in groups)
    assert all(g["weight_decay"] == g["initial_weight_decay"] for g in groups)
    # the scheduler's state is saved under detectron2's hook name (resumes of earlier runs)
    assert "LRScheduler" in trainer.state_dict()["hooks"]
