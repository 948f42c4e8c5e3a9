"""Elastic restarts across torchrun agents, and ranks whose peers are gone.

* A new generation of workers meets in a store of its own, whatever each agent's restart count says.
* Two torchrun agents (c10d rendezvous, split placement, DeepSpeed ZeRO-1): a worker killed after a
  checkpoint; both agents restart, the run resumes and ends with the uninterrupted run's metrics.
* A rank whose peer never arrives, or stalls mid-run, stops within ``dist.timeout_s`` naming it.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_coop.distributed.env import close_distributed, init_distributed
from dist_coop.ports import free_port
from tests.dist_helpers import TINY, children, rank_env, start_workers

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            env.pop(key, None)
    return env


def _config(out_dir: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, f"--train.out_dir={out_dir}", f"--train.run_name={name}", "--train.device=cpu", *extra]


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert path.exists() and all(p.poll() is None for p in procs), f"{path} not written while the run was on"


# ---------------------------------------------------------------- 8. a store per generation


def _generation_worker(rank: int, world_size: int, port: int, restart_counts: list[int], out_dir: str) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    os.environ.update({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": str(restart_counts[rank])})
    info = init_distributed("cpu", backend="gloo", need_group=True, timeout_s=30)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    Path(out_dir, f"rank{rank}").write_text(str(t.item()))
    close_distributed(info)


@pytest.mark.slow  # starts processes
def test_each_generation_meets_in_its_own_store(tmp_path):
    """Workers use an agent's store that outlives a restart (what torchrun's c10d rendezvous gives them),
    and the agents' restart counts differ (an agent that restarts for a peer's failure counts none): the
    second generation still forms its group, instead of reading the first one's gloo addresses."""
    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=timedelta(seconds=60))
    for generation, counts in enumerate(([0, 0, 0], [1, 1, 0])):
        out = tmp_path / f"generation{generation}"
        out.mkdir()
        args = (3, agent_store.port, counts, str(out))
        start_workers(_generation_worker, args, 3)
        assert [float((out / f"rank{r}").read_text()) for r in range(3)] == [6.0, 6.0, 6.0]


# ---------------------------------------------------------------- 8. two agents, a worker killed


def _two_agents(out_dir: Path, name: str, *extra: str) -> list[subprocess.Popen]:
    """Two torchrun agents on this machine, what two nodes run: 2 workers and 1 (a world of 3, one net per rank;
    the agents' local world sizes need not be equal)."""
    cfg = _config(
        out_dir,
        name,
        "--dist.placement=split",
        "--dist.engine=deepspeed",
        "--dist.zero_stage=1",
        "--train.resume=auto",
        *extra,
    )
    rdzv = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", name]
    torchrun = [str(BIN / "torchrun"), "--nnodes", "2", "--max-restarts", "1", *rdzv]
    env = _env(LOGLEVEL="INFO")  # the agents log their restarts: the test waits on those lines
    return [
        subprocess.Popen(
            [*torchrun, "--nproc_per_node", str(nproc), "launch/train.py", *cfg],
            cwd=ROOT,
            env=env,
            stdout=open(out_dir / f"{name}.agent{i}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for i, nproc in enumerate((2, 1))
    ]


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL those of these processes still running, and their children (paused ones too)."""
    for p in procs:
        if p.poll() is not None:
            continue
        for pid in [*children(p.pid), p.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()


def _finish(procs: list[subprocess.Popen], out_dir: Path, name: str, timeout: float) -> list[str]:
    """Wait for both agents; both must succeed. Their logs."""
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        _kill(procs)
    logs = [(out_dir / f"{name}.agent{i}.log").read_text() for i in range(len(procs))]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"agent {i}: exit code {p.returncode}\n{logs[i][-4000:]}"
    return logs


def _log_has(path: Path, text: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in path.read_text():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_two_agents_worker_killed_resumes_and_matches(tmp_path, fmnist_root):
    """torchrun --nnodes 2 (2 workers and 1) --rdzv_backend c10d --max-restarts 1, split, ZeRO-1.

    After the first checkpoint, agent 1's worker is paused and one worker of agent 0 is killed: agent 0
    restarts counting a restart, agent 1 restarts for the membership change without counting one (what
    happens whenever its workers are still busy when agent 0 is back), so the agents' restart counts
    differ. Both generations' workers meet, the run resumes from the checkpoint and ends with the
    per-depth metrics of the uninterrupted run."""
    common = ["--train.max_steps=8", "--train.checkpoint_every=4", "--dist.timeout_s=20"]
    _finish(_two_agents(tmp_path, "clean", *common), tmp_path, "clean", timeout=300)
    reference = json.loads((tmp_path / "clean" / "results.json").read_text())

    procs = _two_agents(tmp_path, "crash", *common)
    try:
        _wait_for(tmp_path / "crash" / "checkpoints" / "latest", procs, timeout=300)
        killed_at = (tmp_path / "crash" / "checkpoints" / "latest").read_text()
        paused = children(procs[1].pid)
        assert len(paused) == 1 and len(children(procs[0].pid)) == 2
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        os.kill(children(procs[0].pid)[0], signal.SIGKILL)
        # agent 1 sees agent 0 waiting for a new round while its own workers are alive: not a counted restart
        detected = _log_has(tmp_path / "crash.agent1.log", "new nodes from group_rank", timeout=120)
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        assert detected, (tmp_path / "crash.agent1.log").read_text()[-4000:]
    except BaseException:
        _kill(procs)
        raise
    logs = _finish(procs, tmp_path, "crash", timeout=300)
    assert "restart_count=1" in logs[0] and "restart_count=0" in logs[1].split("new nodes from group_rank")[-1]
    assert "resumed from" in "".join(logs)
    got = json.loads((tmp_path / "crash" / "results.json").read_text())
    assert killed_at < "step_00000008" and got["step"] == reference["step"] == 8
    assert got["metrics"] == pytest.approx(reference["metrics"], rel=1e-6)


# ---------------------------------------------------------------- 9. no hang without end


@pytest.mark.slow  # starts processes
def test_rank_whose_peer_never_arrives_stops_within_timeout(tmp_path, fmnist_root):
    """Rank 0 of a world of 2 whose rank 1 never starts: exit code 1 and one line naming dist.timeout_s, after
    about that long (torch's default would wait 30 minutes)."""
    port = str(free_port())
    env = _env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    cmd = [sys.executable, "launch/train.py", *_config(tmp_path, "alone", "--dist.timeout_s=3")]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dist-coop: error: rank 0: ") and "dist.timeout_s=3 s" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert 3 <= elapsed < 60


@pytest.mark.slow  # starts processes
def test_ranks_whose_peer_stalls_stop_within_timeout(tmp_path, fmnist_root):
    """3 ranks, split placement: after a checkpoint rank 2 is paused (SIGSTOP: alive, silent). Ranks 0 and 1
    wait for it in the exchange group's all-gather (a group of our own, not the default one) and stop after
    dist.timeout_s with exit code 1 and one line naming it."""
    timeout_s = 8
    port = str(free_port())
    extra = ["--dist.placement=split", f"--dist.timeout_s={timeout_s}", "--train.checkpoint_every=2"]
    cmd = [sys.executable, "launch/train.py", *_config(tmp_path, "stall", *extra)]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    try:
        _wait_for(tmp_path / "stall" / "checkpoints" / "latest", procs, timeout=120)
        os.kill(procs[2].pid, signal.SIGSTOP)
        stopped = time.time()
        errors = [p.communicate(timeout=timeout_s + 60)[1] for p in procs[:2]]
        elapsed = time.time() - stopped
    finally:
        _kill(procs)
    lasts = []
    for p, err in zip(procs[:2], errors):
        assert p.returncode == 1, err[-3000:]
        lasts.append(err.strip().splitlines()[-1])
    # the first rank to time out names the timeout; the other may see that rank leave (its connection closes)
    # before its own timer fires, and then says so: both stop, each with one line
    timed_out = [
        last
        for r, last in enumerate(lasts)
        if last.startswith(f"dist-coop: error: rank {r}: no answer from the other ranks within dist.timeout_s")
    ]
    assert timed_out, lasts
    assert all(f"{timeout_s * 1000}ms" in last for last in timed_out), timed_out
    for r, last in enumerate(lasts):
        assert last in timed_out or last.startswith(f"dist-coop: error: rank {r}: another rank is gone"), last
    assert timeout_s - 1 <= elapsed < timeout_s + 45
