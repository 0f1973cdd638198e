"""fiber_d2.engine.cli.launch_cli: a multi-process CPU run hides the GPUs from its workers."""

import os
import sys

import pytest
from detectron2.config import get_cfg

from fiber_d2 import add_fiber_config
from fiber_d2.engine import cli


def _cfg(device: str):
    cfg = get_cfg()
    add_fiber_config(cfg)
    cfg.MODEL.DEVICE = device
    return cfg


@pytest.mark.parametrize(
    "device,num_gpus,hidden",
    [("cpu", 2, True), ("cpu", 1, False), ("cuda", 2, False)],
)
def test_cpu_workers_do_not_see_the_gpus(monkeypatch, device, num_gpus, hidden):
    """detectron2's launch picks NCCL (and asserts N <= the GPU count) whenever CUDA is visible;
    the workers of ``--num-gpus N MODEL.DEVICE cpu`` must find none and take gloo."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    seen = {}

    def fake_launch(main, num_gpus_per_machine, **kwargs):
        seen["env"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen["num_gpus"] = num_gpus_per_machine

    monkeypatch.setattr(cli, "launch", fake_launch)
    monkeypatch.setattr(cli, "validate_config", lambda cfg, training: None)
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--num-gpus", str(num_gpus)])
    cli.launch_cli(lambda args: None, load=lambda path, opts: _cfg(device))
    assert seen == {"env": "" if hidden else "0", "num_gpus": num_gpus}


def _end_together(rank, init_file, folder, finished):
    import json
    import time

    import torch.distributed as dist

    from fiber_d2.engine.cli import end_processes_together

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(1.0)  # the main process still scoring and writing results.json
    done = time.time()
    end_processes_together(finished)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump({"done": done, "left": time.time(), "open": dist.is_initialized()}, f)


def test_processes_end_together_and_close_their_group(tmp_path):
    """A rank returned from run() while the main process still wrote results.json; its exit could
    abort in gloo's teardown and launch then killed the main process before it had written."""
    import json

    import torch.multiprocessing as mp

    finished = mp.get_context("spawn").Array("b", 2)
    ctx = mp.spawn(
        _end_together,
        args=(str(tmp_path / "init"), str(tmp_path), finished),
        nprocs=2,
        join=False,
    )
    for p in ctx.processes:  # a gloo abort at exit, after the files are written, is not the code's
        p.join(120)
        assert not p.is_alive(), "a rank did not finish (left in a collective)"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["left"] >= ranks[0]["done"]  # rank 1 waited for the main process
    assert not ranks[0]["open"] and not ranks[1]["open"]
    assert list(finished) == [1, 1]  # each marked itself for launch_cli


@pytest.mark.parametrize("finished", [(1, 1), (1, 0)])
def test_a_worker_dying_at_exit_after_every_run_finished_is_not_a_failure(monkeypatch, finished):
    """Gloo may abort a worker while it tears down, after run() returned everywhere: the run's
    results are complete, but the launcher reported "error: worker process 1 exited with code -6"
    and exited with status 1. A worker that died before finishing is still an error."""
    from torch.multiprocessing import ProcessExitedException

    def fake_launch(main, num_gpus_per_machine, *, args, **kwargs):
        for rank, done in enumerate(finished):
            args[0].finished_ranks[rank] = done
        raise ProcessExitedException("died", error_index=1, error_pid=0, exit_code=-6)

    monkeypatch.setattr(cli, "launch", fake_launch)
    monkeypatch.setattr(cli, "validate_config", lambda cfg, training: None)
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--num-gpus", "2"])
    if all(finished):
        cli.launch_cli(lambda args: None, load=lambda path, opts: _cfg("cpu"))
    else:
        with pytest.raises(SystemExit, match="error: worker process 1 exited with code -6"):
            cli.launch_cli(lambda args: None, load=lambda path, opts: _cfg("cpu"))


FINE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "Demo", "fine_tiny.yaml")


def _args(tmp_path, *, eval_only=False, resume=False):
    """The command line ``launch_cli`` parses, with detectron2's parser."""
    from detectron2.engine import default_argument_parser

    flags = ["--eval-only"] * eval_only + ["--resume"] * resume
    argv = ["--config-file", FINE, *flags, "OUTPUT_DIR", str(tmp_path)]
    return default_argument_parser().parse_args(argv)


@pytest.mark.parametrize("eval_only", [False, True])
@pytest.mark.parametrize("resume", [False, True])
def test_run_passes_resume_to_the_weights_it_loads(monkeypatch, tmp_path, eval_only, resume):
    """``--resume`` continues from OUTPUT_DIR's last checkpoint, in training and in --eval-only;
    only a training run without it warns that it starts over an earlier run."""
    seen = {}

    class Checkpointer:
        def __init__(self, model, **kwargs):
            pass

        def resume_or_load(self, path, *, resume):
            seen["eval_resume"] = resume

    class Trainer:
        def __init__(self, cfg):
            pass

        def resume_or_load(self, *, resume):
            seen["train_resume"] = resume

        def train(self):
            pass

        @classmethod
        def build_model(cls, cfg):
            return None

        @classmethod
        def test(cls, cfg, model):
            return {}

    monkeypatch.setattr(cli, "check_before_run", lambda *a, **k: None)
    monkeypatch.setattr(cli, "FIBERCheckpointer", Checkpointer)
    monkeypatch.setattr(cli, "warn_if_starting_over", lambda d: seen.setdefault("warned", True))
    cli.run(_args(tmp_path, eval_only=eval_only, resume=resume), Trainer)
    expected = {"eval_resume" if eval_only else "train_resume": resume}
    if not eval_only and not resume:
        expected["warned"] = True
    assert seen == expected


@pytest.mark.parametrize("eval_only", [False, True])
def test_a_user_error_inside_the_run_is_one_line(monkeypatch, tmp_path, eval_only):
    """A dataset record or an evaluation found wrong once the run has started ends in one
    ``error:`` line, like the pre-run checks, not in a traceback."""
    from fiber_d2.data.datasets.common import BadRecordError
    from fiber_d2.evaluation.integrity import EvaluationCoverageError

    class Checkpointer:
        def __init__(self, model, **kwargs):
            pass

        def resume_or_load(self, path, *, resume):
            pass

    class Trainer:
        def __init__(self, cfg):
            pass

        def resume_or_load(self, *, resume):
            pass

        def train(self):
            raise BadRecordError("dataset 'x': record 3 has no image\n(details)")

        @classmethod
        def build_model(cls, cfg):
            return None

        @classmethod
        def test(cls, cfg, model):
            raise EvaluationCoverageError("2 records were evaluated twice")

    monkeypatch.setattr(cli, "check_before_run", lambda *a, **k: None)
    monkeypatch.setattr(cli, "FIBERCheckpointer", Checkpointer)
    with pytest.raises(SystemExit) as exc:
        cli.run(_args(tmp_path, eval_only=eval_only), Trainer)
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert ("evaluated twice" if eval_only else "record 3 has no image") in message


@pytest.mark.parametrize("eval_only", [False, True])
def test_launch_checks_training_keys_only_for_training(monkeypatch, eval_only):
    """An evaluation does not read the training batch: --eval-only with one the training run
    refuses starts, a training run stops with one line before any worker starts."""
    from fiber_d2.engine.setup import load_config

    launched = []
    monkeypatch.setattr(cli, "launch", lambda main, n, **kwargs: launched.append(n))
    flags = ["--eval-only"] if eval_only else []
    monkeypatch.setattr(sys, "argv", ["train_net.py", *flags, "--config-file", FINE])
    cfg = load_config(FINE, ["SOLVER.IMS_PER_BATCH", "0"])
    if eval_only:
        cli.launch_cli(lambda args: None, load=lambda path, opts: cfg)
        assert launched == [1]
    else:
        with pytest.raises(SystemExit, match="^error: SOLVER.IMS_PER_BATCH 0 must be"):
            cli.launch_cli(lambda args: None, load=lambda path, opts: cfg)
        assert launched == []


_SLEEPING_RUN = """
import os, sys, time

from detectron2.config import get_cfg

from fiber_d2 import add_fiber_config
from fiber_d2.engine import cli


def main(args):
    open(os.path.join(os.environ["WORKERS_FOLDER"], str(os.getpid())), "w").close()
    time.sleep(300)


if __name__ == "__main__":
    cfg = get_cfg()
    add_fiber_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cli.validate_config = lambda cfg, training: None
    sys.argv = ["train_net.py", "--num-gpus", os.environ.get("NUM_GPUS", "2"), "--dist-url", "auto"]
    cli.launch_cli(main, load=lambda path, opts: cfg)
"""


def _kill_and_watch(tmp_path, cmd, num_gpus: int) -> list:
    """Start ``cmd`` (SIGINT ignored, as a shell script's ``... &`` does), wait for the
    ``num_gpus`` sleeping runs it leads to, SIGKILL it; the runs' pids still alive 30 s later."""
    import signal
    import subprocess
    import time

    folder = tmp_path / "workers"
    folder.mkdir()
    env = dict(os.environ, WORKERS_FOLDER=str(folder), NUM_GPUS=str(num_gpus))
    top = subprocess.Popen(
        cmd, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    workers = []
    try:
        deadline = time.time() + 120
        while len(workers) < num_gpus and time.time() < deadline and top.poll() is None:
            time.sleep(0.2)
            workers = [int(p.name) for p in folder.iterdir()]
        assert len(workers) == num_gpus, f"the runs did not start (exit status {top.poll()})"
        top.send_signal(signal.SIGKILL)
        top.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        return [pid for pid in workers if _alive(pid)]
    finally:
        top.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_the_launcher_is_killed(tmp_path):
    """A launcher killed with SIGKILL left its workers training on, writing into OUTPUT_DIR beside
    the run that --resume started next; now each worker ends with it. The launcher starts with
    SIGINT ignored, as a shell script's ``train_net.py ... &`` does: torch's spawn has the workers
    sent SIGINT when the launcher dies, which they then ignore."""
    script = tmp_path / "sleeping_run.py"
    script.write_text(_SLEEPING_RUN)
    assert _kill_and_watch(tmp_path, [sys.executable, str(script)], 2) == []


def _left_by_a_killed_parent(tmp_path, runner: str, child_code: str) -> list:
    """A parent script runs ``child_code`` with ``fiber_d2.engine.cli.<runner>`` and is killed
    (:func:`_kill_and_watch`): the child's pid if it still runs 30 s later."""
    child = tmp_path / "child.py"
    child.write_text(child_code)
    parent = tmp_path / "parent.py"
    parent.write_text(
        f"import sys\nfrom fiber_d2.engine.cli import {runner}\n"
        f"{runner}([sys.executable, {str(child)!r}])\n"
    )
    return _kill_and_watch(tmp_path, [sys.executable, str(parent)], 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_pipelines_stage_ends_when_the_pipeline_is_killed(tmp_path):
    """tools/pretrain_pipeline.py and tools/demo_vl.py run each train_net.py stage with
    ``run_child``: a pipeline killed with SIGKILL left the stage training on beside the one its
    rerun started."""
    assert _left_by_a_killed_parent(tmp_path, "run_child", _SLEEPING_RUN) == []


_SLEEPING_CHILD = """
import os, time
open(os.path.join(os.environ["WORKERS_FOLDER"], str(os.getpid())), "w").close()
time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")
def test_a_tools_measuring_child_ends_when_the_tool_is_killed(tmp_path):
    """tools/benchmark.py and tools/gpu_report.py run their measuring children with ``run_tied``:
    a tool killed with SIGKILL left its child running (on the device) beside its rerun's."""
    assert _left_by_a_killed_parent(tmp_path, "run_tied", _SLEEPING_CHILD) == []


def test_run_tied_runs_the_child_as_subprocess_run_does(tmp_path):
    code = "import os, sys; print(os.getcwd(), os.environ['TIED']); sys.exit(3)"
    env = dict(os.environ, TIED="yes")
    done = cli.run_tied(
        ["python3", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert (done.returncode, done.stdout) == (3, f"{tmp_path} yes\n"), done.stderr


@pytest.mark.parametrize("parent", ["alive, not the parent", "dead"])
def test_a_stage_whose_named_parent_is_not_its_parent(parent):
    """A process between the pipeline and its stage (a wrapper command): the stage runs on, since
    its own parent is not the one to end with; a named parent that already died ends the stage."""
    import subprocess

    if parent == "dead":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        pid = gone.pid
    else:
        pid = 1
    code = (
        "from fiber_d2.engine import cli\n"
        "cli._end_with_the_process_that_ran_this_one()\n"
        "print('on')"
    )
    env = dict(os.environ, **{cli.END_WITH_PARENT_ENV: str(pid)})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if parent == "dead":
        assert (done.returncode, done.stdout) == (1, "")
    else:
        assert (done.returncode, done.stdout) == (0, "on\n"), done.stderr


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
