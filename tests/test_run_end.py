"""How a run ends when it does not simply finish: it diverges (non-finite losses, gradients or weights),
it crashes or is interrupted (the MLflow run says FAILED or KILLED), or it is preempted (SIGTERM: stop at
a step boundary, save, exit 143, resume with nothing lost)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_coop.checkpoint import latest_checkpoint
from dist_coop.cli import main, run_training
from dist_coop.data import build_data
from dist_coop.distributed.env import DistInfo
from dist_coop.guard import NonFiniteError
from dist_coop.preempt import EXIT_PREEMPTED
from dist_coop.trainer import Trainer
from tests.dist_helpers import children, free_port, run_steps, spawn
from tests.helpers import RANKS, TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NETS = ("leader", "teammate_a", "teammate_b")


def _state(trainer: Trainer) -> dict[str, list[torch.Tensor]]:
    return {name: [t.clone() for t in net.state_dict().values()] for name, net in trainer.nets.items()}


def _nan_batch(data) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(data.train.epoch(0))
    return torch.full_like(x, float("nan")), y


# ---------------------------------------------------------------- 5. divergence is not silent


def test_diverging_run_stops_naming_net_step_and_what(tmp_path, fmnist_root, capsys):
    """lr 1e30 (a real divergence): exit code 1, a one-line message naming the net, the step and 'loss';
    a non-finite gradient with a finite loss is named 'gradient'; no checkpoint of the diverged nets."""
    args = ["train", *TINY, f"--train.out_dir={tmp_path}", "--train.run_name=d", "--optim.lr=1e30"]
    assert main([*args, "--train.checkpoint_every=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"dist-coop: error: non-finite loss of (leader|teammate_a|teammate_b)(, \w+ of \w+)* at step \d+ "
        r"\(train\.on_nonfinite: error\); .*train\.on_nonfinite: skip.*",
        err,
    ), err
    step = int(re.search(r"at step (\d+)", err).group(1))
    last = latest_checkpoint(tmp_path / "d")  # every checkpoint written holds the finite weights of a step before
    assert last is None or int(last.name.split("_")[1]) < step

    cfg = tiny_config(tmp_path / "g")
    trainer = Trainer(cfg, build_data(cfg.data, seed=0), run_dir=tmp_path / "g")
    next(trainer.nets["teammate_b"].parameters()).register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient of teammate_b at step 1 "):
        trainer.train_step(*next(trainer.data.train.epoch(0)))


def test_skip_drops_the_step_counts_it_and_gives_up_after_max(tmp_path, fmnist_root):
    """on_nonfinite: skip: a NaN batch changes no weight and no BN statistic, the schedule moves on, the skip
    is counted in train/nonfinite_skipped/<net>; max_nonfinite consecutive skips stop the run."""
    cfg = tiny_config(tmp_path, "--train.on_nonfinite=skip", "--train.max_nonfinite=2")
    data = build_data(cfg.data, seed=0)
    trainer = Trainer(cfg, data, run_dir=tmp_path)
    before, lr = _state(trainer), {n: e.lr() for n, e in trainer.engines.items()}
    logs = trainer.train_step(*_nan_batch(data))
    for name in NETS:
        assert all(torch.equal(a, b) for a, b in zip(before[name], _state(trainer)[name])), name
        assert logs[f"train/nonfinite_skipped/{name}"] == 1.0
        assert trainer.engines[name].lr() != lr[name]  # cosine schedule advanced
    assert trainer.step == 1
    logs = trainer.train_step(*next(data.train.epoch(0)))  # a good step trains and resets the streak
    assert all(v == v for k, v in logs.items() if k.startswith("train/loss/"))  # finite
    assert not torch.equal(before["leader"][0], _state(trainer)["leader"][0])
    trainer.train_step(*_nan_batch(data))
    with pytest.raises(NonFiniteError, match=r"non-finite loss of leader on 2 consecutive steps \(the last: step 4"):
        trainer.train_step(*_nan_batch(data))
    assert trainer.guard.skipped == {name: 3 for name in NETS}


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path, fmnist_root):
    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg, build_data(cfg.data, seed=0), run_dir=tmp_path)
    good = trainer.save()
    trainer.step = 1
    with torch.no_grad():
        next(trainer.nets["teammate_a"].parameters())[0].fill_(float("nan"))
    with pytest.raises(
        NonFiniteError,
        match="refusing to save checkpoint step_00000001: non-finite weights in "
        "teammate_a; the last good checkpoint, step_00000000, is kept",
    ):
        trainer.save()
    assert latest_checkpoint(tmp_path) == good and not (good.parent / "step_00000001").exists()


@pytest.mark.slow
def test_deepspeed_skip_equals_torch_skip(tmp_path, fmnist_root):
    """DeepSpeed (ZeRO 0): a NaN batch is checked on the loss before backward and skipped; the schedule still
    advances, so the run matches the torch engine's skip step for step (clipping off: see test_distributed)."""
    common = ["--optim.grad_clip=0", "--train.on_nonfinite=skip", "--dist.placement=colocated"]
    ref = run_steps(tiny_config(tmp_path / "ref", *RANKS, *common), DistInfo(), 3, nan_steps=(1,))
    (ds,) = spawn(1, tmp_path / "ds", [*common, "--dist.engine=deepspeed"], num_steps=3, nan_steps=(1,))
    assert ds["skipped"] == ref["skipped"] == {name: 1 for name in NETS}
    assert ds["lr"] == [pytest.approx(lr) for lr in ref["lr"]]  # the schedule moved on the skipped step
    for name in NETS:
        assert torch.allclose(ds["params"][name], ref["params"][name], rtol=1e-4, atol=1e-6), name


# ---------------------------------------------------------------- 6. a crashed run is FAILED, an interrupted one KILLED


def test_mlflow_run_ends_failed_on_error_and_killed_on_ctrl_c(tmp_path, fmnist_root, monkeypatch):
    import mlflow

    def run(name, *extra):
        return run_training(tiny_config(tmp_path, "--tracking.backend=mlflow", f"--train.run_name={name}", *extra))

    def ended(name):
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
        (exp,) = [e for e in client.search_experiments() if e.name == "dist_coop"]
        (r,) = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
        return client.get_run(r.info.run_id)

    with pytest.raises(NonFiniteError):
        run("diverged", "--optim.lr=1e30")
    r = ended("diverged")
    assert r.info.status == "FAILED"
    assert r.data.tags["error"].startswith("NonFiniteError: non-finite loss of ")

    calls = []

    def ctrl_c(self, x, y, logs=True):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, x, y, logs=logs)

    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run("interrupted")
    r = ended("interrupted")
    assert r.info.status == "KILLED" and r.data.tags["error"] == "KeyboardInterrupt"


# ---------------------------------------------------------------- 7. preemption: SIGTERM, save, exit 143, resume


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _start_until_first_checkpoint(cmd: list[str], run_dir: Path) -> subprocess.Popen:
    """Start ``cmd`` (output piped) and return it, still running, once ``run_dir`` has a checkpoint."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert marker.exists() and proc.poll() is None, "the run ended before its first checkpoint"
    return proc


def _sigterm_after_first_checkpoint(cmd: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    """Start ``cmd``, send it SIGTERM once ``run_dir`` has a checkpoint, wait for it to end."""
    proc = _start_until_first_checkpoint(cmd, run_dir)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "results.json").read_text())["metrics"]


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resume_matches_uninterrupted_run(tmp_path, fmnist_root):
    """One process: SIGTERM after the first checkpoint stops at the next step boundary, saves, exits 143 and
    leaves the MLflow run KILLED; --train.resume=auto ends with the uninterrupted run's metrics, bit for bit."""
    import mlflow

    common = [*TINY, f"--train.out_dir={tmp_path}", "--train.checkpoint_every=2", "--train.threads=1"]
    common += ["--train.epochs=2", "--tracking.backend=mlflow", "--train.resume=auto", "--train.device=cpu"]
    threads = torch.get_num_threads()
    try:
        assert main(["train", *common, "--train.run_name=clean"]) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "dist_coop.cli", "train", *common, "--train.run_name=stopped"]
    stopped = _sigterm_after_first_checkpoint(cmd, tmp_path / "stopped")
    assert stopped.returncode == EXIT_PREEMPTED == 143, stopped.stdout[-3000:]
    m = re.search(
        r"dist-coop: rank 0: stopped at step (\d+) of 16 on a stop signal; checkpoint (step_\d+) saved", stopped.stdout
    )
    assert m, stopped.stdout[-3000:]
    assert 2 <= int(m.group(1)) < 16 and latest_checkpoint(tmp_path / "stopped").name == m.group(2)
    assert f"step_{int(m.group(1)):08d}" == m.group(2)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "dist_coop"]
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'stopped'")
    assert run.info.status == "KILLED" and run.data.tags["error"].startswith("Preempted: rank 0: stopped at step")

    resumed = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'stopped' / 'checkpoints' / m.group(2)}" in resumed.stdout + resumed.stderr
    assert _metrics(tmp_path / "stopped") == _metrics(tmp_path / "clean")  # bit-identical on CPU
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags


# the torchrun runs below: 2 colocated ranks, 3 epochs of 4 steps, a checkpoint every 2 steps
TORCHRUN_RUN = [*TINY, "--train.checkpoint_every=2", "--train.threads=1", "--train.epochs=3", "--train.resume=auto"]
TORCHRUN_RUN += ["--train.device=cpu", "--dist.placement=colocated"]


def _torchrun(out_dir: Path, name: str, *launcher: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", *launcher, "launch/train.py", *TORCHRUN_RUN,
            f"--train.out_dir={out_dir}", f"--train.run_name={name}"]  # fmt: skip


@pytest.fixture(scope="module")
def torchrun_clean(tmp_path_factory, fmnist_root) -> dict[str, float]:
    """The uninterrupted torchrun run's final metrics: what an interrupted and resumed one must end with."""
    out = tmp_path_factory.mktemp("torchrun")
    cmd = _torchrun(out, "clean", "--master_port", str(free_port()))
    clean = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    return _metrics(out / "clean")


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_at_the_same_step(tmp_path, torchrun_clean):
    """torchrun, 2 colocated ranks: SIGTERM to the agent, which forwards it to its workers; both ranks stop
    after the same step and save one checkpoint; resuming ends with the uninterrupted run's metrics."""
    stopped = _sigterm_after_first_checkpoint(
        _torchrun(tmp_path, "stopped", "--master_port", str(free_port())), tmp_path / "stopped"
    )
    assert stopped.returncode != 0  # the agent's own SIGTERM ends it with an error
    lines = re.findall(
        r"dist-coop: rank (\d): stopped at step (\d+) of 12 on a stop signal; checkpoint (step_\d+)", stopped.stdout
    )
    assert sorted(r for r, _, _ in lines) == ["0", "1"], stopped.stdout[-4000:]
    assert len({(s, c) for _, s, c in lines}) == 1  # the same step and checkpoint on both ranks
    step, tag = int(lines[0][1]), lines[0][2]
    assert step < 12 and latest_checkpoint(tmp_path / "stopped").name == tag
    resume = _torchrun(tmp_path, "stopped", "--master_port", str(free_port()))
    resumed = subprocess.run(resume, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(tmp_path / "stopped") == torchrun_clean  # replica 1's BN statistics saved too


@pytest.mark.slow
def test_rank_killed_mid_run_resumes_and_matches(tmp_path, torchrun_clean):
    """SIGKILL one rank under torchrun --max-restarts=1: the agent restarts both, the run resumes from the last
    checkpoint and ends with the uninterrupted run's metrics. Elastic (c10d) rendezvous (--standalone): a
    restart starts a fresh rendezvous round, so the new workers' process groups never meet the dead ones'
    addresses."""
    proc = _start_until_first_checkpoint(
        _torchrun(tmp_path, "crash", "--standalone", "--max-restarts", "1"), tmp_path / "crash"
    )
    killed_at = (tmp_path / "crash" / "checkpoints" / "latest").read_text()
    victims = children(proc.pid)
    assert len(victims) == 2
    os.kill(victims[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    assert killed_at < "step_00000012" and json.loads((tmp_path / "crash" / "results.json").read_text())["step"] == 12
    assert _metrics(tmp_path / "crash") == torchrun_clean
