"""MLflow under faults: jobs started together on one SQLite store, a full disk under the store, the final
checkpoint in MLflow by reference (not a second copy of every file), and runs whose process was killed outright
(left RUNNING): reopened, they record the truth, and no command but a resume ends a run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_coop.checkpoint import latest_checkpoint
from dist_coop.choices import CHECKPOINT_MODES
from dist_coop.cli import main, run_training
from dist_coop.ports import free_port
from dist_coop.track.base import TrackingError
from dist_coop.trainer import Trainer
from tests.helpers import TINY, small_tmpfs, tiny_config

ROOT = Path(__file__).resolve().parents[1]
NETS = ("leader", "teammate_a", "teammate_b")
MLFLOW = ["--tracking.backend=mlflow", "--train.resume=auto", "--train.threads=1", "--train.device=cpu"]
REPORTED = {"config.yaml", "results.txt", "results.json", "accuracy_vs_gflops.png"}  # logged whatever the mode


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def _run(uri: str, name: str = "t"):
    client = _client(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "dist_coop"]
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    return client.get_run(run.info.run_id)


def _store(out_dir: Path) -> str:
    return f"sqlite:///{out_dir.resolve() / 'mlflow.db'}"


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _train(out_dir: Path, *extra: str) -> dict:
    threads = torch.get_num_threads()
    try:
        return run_training(tiny_config(out_dir, *MLFLOW, *extra))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- 1. jobs started together on one store

STARTER = """
import sys, time
from pathlib import Path
from dist_coop.track.mlflow_tracker import MlflowTracker, default_uri
out, i = Path(sys.argv[1]), int(sys.argv[2])
(out / f"ready{i}").touch()
while not (out / "go").exists():
    time.sleep(0.001)
tracker = MlflowTracker(default_uri(out), "dist_coop", f"job{i}", artifact_dir=out / "mlartifacts")
for step in range(30):
    tracker.log_metrics(step, {f"train/loss/net{k}": step * k for k in range(20)})
tracker.close()
"""


@pytest.mark.slow
def test_jobs_started_together_on_one_fresh_store_all_succeed(tmp_path):
    """Four processes open one fresh mlflow.db at the same moment (each waits, imports done, for a file), then
    each logs 30 steps while the others do. Unlocked, MLflow's table creation races in alembic's migrations
    ("Online migration expected to match one row ...") and all but one die."""
    jobs = [
        subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path), str(i)], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(4)
    ]  # fmt: skip
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [job.communicate(timeout=180)[0] for job in jobs]
    for job, out in zip(jobs, outs):
        assert job.returncode == 0, out[-3000:]
    assert (tmp_path / "mlflow.db.lock").is_file()  # the lock beside the store
    client = _client(_store(tmp_path))
    for i in range(4):
        run = _run(_store(tmp_path), f"job{i}")
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "train/loss/net3")) == 30


# ---------------------------------------------------------------- 2. a full disk under the store


def _fill(folder: Path) -> None:
    """Write zeros into ``folder/filler`` until its disk is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as e:
        assert e.errno == 28  # ENOSPC
    finally:
        os.close(fd)


def test_full_disk_under_the_store_stops_the_run_in_one_line_and_resume_continues(
    tmp_path, fmnist_root, monkeypatch, capfd
):
    """The store on a 3 MB tmpfs that fills up after step 3 (checkpoints every 2 steps, on another disk): the run
    stops with one line naming the store and the disk, MLflow's 40-line SQLAlchemy traceback is not printed, the
    checkpoint of step 2 stays; with room again, a resume continues the same MLflow run to the end."""
    out = tmp_path / "out"
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        args = [f"--tracking.uri={uri}", "--train.checkpoint_every=2"]
        original, calls = Trainer.train_step, []

        def fill_after_step_3(self, x, y, logs=True):
            result = original(self, x, y, logs=logs)
            calls.append(1)
            if len(calls) == 3:
                _fill(disk)
            return result

        monkeypatch.setattr(Trainer, "train_step", fill_after_step_3)
        with pytest.raises(TrackingError) as failed:
            _train(out, *args)
        message = str(failed.value)
        assert "\n" not in message
        assert message.startswith(f"MLflow store {uri}: could not log the metrics of step 3: ")
        assert f"the disk of {disk / 'mlflow.db'}, {disk} (tmpfs), " in message
        assert message.endswith(
            "is full; free space there, or set tracking.uri to a store on another disk (tracking.backend: none "
            "to train without tracking)"
        )
        err = capfd.readouterr().err
        assert "Traceback" not in err and "SQLAlchemy database error" not in err, err[-3000:]
        # the store could not record the end either: said in one line, naming it
        (closing,) = [line for line in err.splitlines() if "could not close" in line]
        assert closing.startswith(f"dist-coop: could not close the tracker's run as FAILED: MLflow store {uri}")
        assert latest_checkpoint(out / "t").name == "step_00000002"

        (disk / "filler").unlink()
        monkeypatch.setattr(Trainer, "train_step", original)
        results = _train(out, *args)
        assert results["step"] == 16
        run = _run(uri)
        assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
        assert run.data.tags["attempt/1/status"] == "KILLED"  # left RUNNING by the full store, found so
        history = _client(uri).get_metric_history(run.info.run_id, "train/loss/leader")
        assert {h.step for h in history} == set(range(1, 17))


def test_full_disk_under_the_artifacts_names_that_disk(tmp_path):
    """The store on one disk, the artifacts on a full one: the line names the artifacts' disk."""
    from dist_coop.track.mlflow_tracker import MlflowTracker

    report = tmp_path / "results.json"
    report.write_bytes(bytes(200_000))
    store = _store(tmp_path / "store")
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        tracker = MlflowTracker(store, "dist_coop", "a", artifact_dir=disk / "mlartifacts")
        _fill(disk)
        with pytest.raises(TrackingError) as failed:
            tracker.log_artifact(report)
        tracker.close("FAILED", "disk full")
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"MLflow store {store}: could not log the artifact results.json: the disk of {disk}/")
    assert f", {disk} (tmpfs), 0 bytes free is full" in message
    assert _run(store, "a").info.status == "FAILED"  # the store itself had room


# ---------------------------------------------------------------- 3. the final checkpoint in MLflow


def test_log_checkpoint_reference_names_the_folder_and_copies_no_checkpoint_file(tmp_path, fmnist_root):
    _train(tmp_path, "--train.epochs=1")  # default: tracking.log_checkpoint: reference
    final = latest_checkpoint(tmp_path / "t").resolve()
    run = _run(_store(tmp_path))
    client = _client(_store(tmp_path))
    assert _artifacts(client, run.info.run_id) == REPORTED | {"checkpoint.txt"}
    assert run.data.tags["checkpoint"] == str(final)
    store = tmp_path / "mlartifacts" / run.info.run_id / "artifacts"
    assert (store / "checkpoint.txt").read_text() == f"{final}\n"
    assert not list(store.rglob("*.pt"))
    reported = sum((store / name).stat().st_size for name in REPORTED)
    assert _tree_bytes(store) - reported < 1000  # the checkpoint costs MLflow a path
    assert _tree_bytes(final) > 10 * (_tree_bytes(store) - reported)


def test_log_checkpoint_weights_logs_each_nets_weights_once(tmp_path, fmnist_root):
    """Two launches (a resume with one more epoch): one file per net, the final weights, no optimizer state, no
    trainer state; the checkpoint stays in the run folder only."""
    _train(tmp_path, "--train.epochs=1", "--tracking.log_checkpoint=weights")
    _train(tmp_path, "--train.epochs=2", "--tracking.log_checkpoint=weights")
    final = latest_checkpoint(tmp_path / "t")
    assert final.name == "step_00000016"
    run = _run(_store(tmp_path))
    assert _artifacts(_client(_store(tmp_path)), run.info.run_id) == REPORTED | {f"weights/{n}.pt" for n in NETS}
    assert run.data.tags["checkpoint"] == str(final.resolve())
    store = tmp_path / "mlartifacts" / run.info.run_id / "artifacts"
    assert {p.name for p in store.rglob("*.pt")} == {f"{n}.pt" for n in NETS}
    for net in NETS:
        logged = torch.load(store / "weights" / f"{net}.pt", weights_only=True)
        saved = torch.load(final / f"{net}.pt", weights_only=True)
        assert set(logged) == {"module"} and "optimizer" in saved
        assert logged["module"].keys() == saved["module"].keys()
        assert all(torch.equal(logged["module"][k], saved["module"][k]) for k in saved["module"])
        assert (store / "weights" / f"{net}.pt").stat().st_size < (final / f"{net}.pt").stat().st_size


@pytest.mark.slow
def test_log_checkpoint_weights_of_a_deepspeed_run_are_its_module_states(tmp_path, fmnist_root):
    """The DeepSpeed engine (ZeRO 0, one process): each net's module states, without the optimizer states that
    DeepSpeed's file holds beside them."""
    env = dict(_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "dist_coop.cli", "train", *TINY, f"--train.out_dir={tmp_path}", "--train.run_name=t",
           *MLFLOW, "--train.epochs=1", "--dist.engine=deepspeed", "--tracking.log_checkpoint=weights"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = latest_checkpoint(tmp_path / "t")
    run = _run(_store(tmp_path))
    assert _artifacts(_client(_store(tmp_path)), run.info.run_id) == REPORTED | {f"weights/{n}.pt" for n in NETS}
    store = tmp_path / "mlartifacts" / run.info.run_id / "artifacts"
    for net in NETS:
        (states,) = (final / net / final.name).glob("*model_states.pt")
        saved = torch.load(states, weights_only=False)
        logged = torch.load(store / "weights" / f"{net}.pt", weights_only=True)
        assert set(logged) == {"module"} and saved["optimizer"] is not None
        assert all(torch.equal(logged["module"][k], saved["module"][k]) for k in saved["module"])
        assert (store / "weights" / f"{net}.pt").stat().st_size < states.stat().st_size


def test_log_checkpoint_none_logs_nothing_of_it(tmp_path, fmnist_root):
    _train(tmp_path, "--train.epochs=1", "--tracking.log_checkpoint=none")
    run = _run(_store(tmp_path))
    assert _artifacts(_client(_store(tmp_path)), run.info.run_id) == REPORTED
    assert "checkpoint" not in run.data.tags
    assert latest_checkpoint(tmp_path / "t") is not None  # kept in the run folder


def test_log_checkpoint_choices_are_the_trackers():
    with pytest.raises(ValueError, match=r"tracking\.log_checkpoint must be one of (\[.*\]), got 'all'") as bad:
        tiny_config("x", "--tracking.log_checkpoint=all")
    assert str(list(CHECKPOINT_MODES)) in str(bad.value)


# ---------------------------------------------------------------- 4. runs killed outright (left RUNNING)


def _start_training(out_dir: Path, *extra: str) -> subprocess.Popen:
    """``dist-coop train`` in a subprocess, returned once its run has a checkpoint (and so its MLflow run)."""
    cmd = [sys.executable, "-m", "dist_coop.cli", "train", *TINY, f"--train.out_dir={out_dir}", "--train.run_name=t",
           *MLFLOW, "--train.checkpoint_every=2", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = out_dir / "t" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert marker.exists() and proc.poll() is None, proc.stderr.read()[-3000:] if proc.poll() is not None else ""
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _profile(run_dir: Path) -> None:
    threads = torch.get_num_threads()
    try:
        assert main(["profile", str(run_dir), "--repeats", "1", "--batch", "1"]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_profile_leaves_a_live_run_running_and_marks_a_killed_one_killed(tmp_path, fmnist_root, capsys):
    """Profile while the trainer runs: the run stays RUNNING (profiled all the same). SIGKILL the trainer, profile
    again: KILLED, with the attempt's record, never FINISHED: no command but a resume ends a run."""
    # a checkpoint every 20 steps, all kept: the one profile reads stays while the trainer goes on
    proc = _start_training(tmp_path, "--train.epochs=100", "--train.checkpoint_every=20", "--dist.keep_checkpoints=100")
    try:
        _profile(tmp_path / "t")
        run = _run(_store(tmp_path))
        assert run.info.status == "RUNNING"  # the trainer is alive
        assert run.data.tags["dist_coop.pid"] == str(proc.pid)
        assert proc.poll() is None  # it was alive all along
    finally:
        _kill(proc)
    assert _run(_store(tmp_path)).info.status == "RUNNING"  # what SIGKILL leaves

    capsys.readouterr()
    _profile(tmp_path / "t")
    assert "was RUNNING but its trainer is gone: marked KILLED" in capsys.readouterr().out
    run = _run(_store(tmp_path))
    assert run.info.status == "KILLED"
    tags = run.data.tags
    assert tags["attempt/1/status"] == "KILLED"
    assert tags["attempt/1/found_unclosed"].endswith(" by dist-coop profile")
    assert tags["error"] == tags["attempt/1/error"]
    assert tags["error"].startswith(f"Unclosed: process {proc.pid} on ")
    history = _client(_store(tmp_path)).get_metric_history(
        run.info.run_id, "profile/latency_ms_b1/teammate_a/depth_1.0"
    )
    assert len(history) == 2  # both profiles logged

    _profile(tmp_path / "t")  # once KILLED, it stays so
    assert _run(_store(tmp_path)).info.status == "KILLED"


@pytest.mark.slow
def test_resume_after_sigkill_records_the_killed_attempt_and_finishes(tmp_path, fmnist_root):
    """SIGKILL after the first checkpoint leaves the run RUNNING; the resume records attempt 1 as KILLED (unclosed),
    owns the run and ends it FINISHED."""
    _kill(_start_training(tmp_path, "--train.epochs=2"))
    killed = _run(_store(tmp_path))
    assert killed.info.status == "RUNNING"
    results = _train(tmp_path, "--train.epochs=2", "--train.checkpoint_every=2")
    assert results["step"] == 16
    run = _run(_store(tmp_path))
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["resumes"] == "1"
    assert tags["attempt/1/status"] == "KILLED"
    assert tags["attempt/1/found_unclosed"].endswith(" by a resume")
    assert tags["attempt/1/error"].startswith(f"Unclosed: process {killed.data.tags['dist_coop.pid']} on ")
    assert "error" not in tags  # finished: the last attempt's error is history now
    assert tags["dist_coop.pid"] == str(os.getpid())  # the resume owns the run
