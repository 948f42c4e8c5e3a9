"""A run continued on fewer ranks (a node lost for good): the data, the optimizer state and the log.

* Per-rank simulation in one process: V = 2 virtual data shards read by 2 exchange groups, then by 1 from a
  mid-epoch step on: every step's batch is the original global batch, every sample of the epoch seen once, for
  the in-memory and the streamed batches.
* Real processes: runs on 2 ranks (colocated) and on 3 (split) that lose their ranks after a checkpoint and
  continue on 1 with ``--train.resume=auto``, torch engine and DeepSpeed ZeRO-1/2: they finish, and the optimizer
  state after loading is the saved one. ZeRO-3 is refused in one line. The replicas' BN statistics.
* Two torchrun agents (``--nnodes 1:2``): one node is lost for good; the survivor continues alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_coop.checkpoint import TrainerState
from dist_coop.cli import run_training
from dist_coop.config import load_config
from dist_coop.data import build_data
from dist_coop.data.batches import Merged, virtual_shards
from dist_coop.data.memory import MemoryBatches, Split
from dist_coop.data.shards import read_index, write_shards
from dist_coop.data.sources import bundled
from dist_coop.data.stream import ShardBatches
from dist_coop.distributed.engine import DeepSpeedEngine, load_replica_buffers, save_replica_buffers
from dist_coop.distributed.env import DistInfo, close_distributed, init_distributed
from dist_coop.distributed.placement import plan_placement
from dist_coop.distributed.resize import check_data_shards
from dist_coop.ports import free_port
from dist_coop.trainer import Trainer
from tests.dist_helpers import children, rank_env, start_workers
from tests.helpers import RANKS, TINY, tiny_config

# ---------------------------------------------------------------- 1. the data, rank by rank in one process


def _memory(augment: bool) -> MemoryBatches:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)
    return MemoryBatches(
        Split(images, labels), batch_size=8, mean=(0.5,), std=(0.25,), train=True, seed=3, padding=2, augment=augment
    )


def _shards(root: Path, augment: bool) -> ShardBatches:
    index = read_index(root)
    return ShardBatches(
        root,
        index,
        "train",
        batch_size=8,
        mean=index["mean"],
        std=index["std"],
        train=True,
        channels=len(index["mean"]),
        seed=3,
        padding=2,
        augment=augment,
        shuffle_buffer=16,
    )


def _global_batches(train, groups: int, virtual: int, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """What the ``groups`` exchange groups read together at each step from ``start`` on: their batches, in order."""
    streams = [virtual_shards(train, k, groups, virtual).epoch(epoch, start) for k in range(groups)]
    return [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])) for step in zip(*streams)]


def _samples(batches) -> Counter:
    """Each sample of the batches, by its label and its pixels' bytes (augmentation off)."""
    return Counter((int(y), x.numpy().tobytes()) for xs, ys in batches for x, y in zip(xs, ys))


def _check_shrink(train, *, epoch: int, start: int) -> Counter:
    """2 exchange groups for steps [0, start), then 1 (reading both virtual shards) to the epoch's end: every step
    is the uninterrupted 2-group layout's global batch, pixel for pixel (augmentation on); every sample of the
    epoch is seen once, as in that layout (augmentation off). Returns the samples seen."""
    original = _global_batches(train, 2, 2, epoch)
    assert len(virtual_shards(train, 0, 1, 2)) == len(virtual_shards(train, 0, 2, 2)) == len(original)
    shrunk = _global_batches(train, 2, 2, epoch)[:start] + _global_batches(train, 1, 2, epoch, start)
    assert len(shrunk) == len(original) > start
    for t, ((x, y), (x0, y0)) in enumerate(zip(shrunk, original)):
        assert torch.equal(y, y0) and torch.equal(x, x0), t
    plain = dataclasses.replace(train, augment=False)
    one = virtual_shards(plain, 0, 1, 2)
    assert isinstance(one, Merged) and one.batch_size == 2 * train.batch_size
    unaugmented = _global_batches(plain, 2, 2, epoch)[:start] + list(one.epoch(epoch, start))
    seen = _samples(unaugmented)
    assert seen == _samples(_global_batches(plain, 2, 2, epoch))
    assert sum(seen.values()) == len(original) * 2 * train.batch_size
    return seen


def test_shrink_keeps_every_step_and_sample_of_memory_batches():
    train = _memory(augment=True)
    assert len({image.numpy().tobytes() for image in train.split.images}) == 200  # every sample told apart
    seen = _check_shrink(train, epoch=1, start=5)  # 200 // 16 = 12 steps: 192 of the 200 samples
    assert len(seen) == 192 and max(seen.values()) == 1


def test_shrink_keeps_every_step_and_sample_of_streamed_shards(tmp_path, fmnist_root):
    write_shards(bundled(), tmp_path / "fm", max_count=32, limit=256, splits=["train"], progress=False)  # 8 shards
    train = _shards(tmp_path / "fm", augment=True)
    _check_shrink(train, epoch=1, start=3)  # 256 // 2 // 8 = 16 steps: every sample once
    plain = _shards(tmp_path / "fm", augment=False)
    everything = dataclasses.replace(plain, train=False)  # the split in order, once
    assert _samples(virtual_shards(plain, 0, 1, 2).epoch(1)) == _samples(everything.epoch(0))


def test_trainer_reads_the_virtual_shards_of_the_run(tmp_path, fmnist_root):
    """A trainer of 1 rank built for a run of 2 data shards: the steps per epoch, the schedule and every step's
    samples are those of the 2 ranks; the micro-batch is doubled. A world whose exchange groups do not divide the
    run's data shards is refused naming the world sizes that work."""
    cfg = tiny_config(tmp_path, "--train.max_steps=5")
    data = build_data(cfg.data, seed=cfg.train.seed)
    two = [data.train.sharded(k, 2) for k in range(2)]
    trainer = Trainer(cfg, data, run_dir=tmp_path, data_shards=2)
    assert trainer.train_data.batch_size == 64 and trainer.steps_per_epoch == len(two[0]) == 4
    assert trainer.layout == {"world_size": 1, "placement": "colocated", "micro_batch": 64}
    for (x, y), *parts in zip(trainer.train_data.epoch(1, 2), two[0].epoch(1, 2), two[1].epoch(1, 2)):
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert trainer.launch_params() == {
        "launch.world": "1 rank colocated",
        "launch.micro_batch": "64",
        "launch.precision": "fp32",
    }

    with pytest.raises(
        ValueError, match=r"\(2 ranks colocated\) cannot share them evenly; launch it on a world size of 1, 3, 9 \("
    ):
        Trainer(cfg, data, run_dir=tmp_path, dist=DistInfo(world_size=2), data_shards=3)  # refused before any group
    placement = plan_placement("auto", 3, ["leader", "teammate_a", "teammate_b"])  # split, 1 exchange group
    check_data_shards(2, placement, "auto")
    with pytest.raises(ValueError, match=r"cannot share them evenly; launch it on a world size of 1, 2, 3, 6 "):
        check_data_shards(2, plan_placement("colocated", 3, ["leader", "teammate_a", "teammate_b"]), "auto")
    with pytest.raises(ValueError, match=r"world size of 3, 6, 12 \(dist.placement split\)"):
        check_data_shards(4, plan_placement("split", 9, ["leader", "teammate_a", "teammate_b"]), "split")


def test_trainer_state_keeps_the_data_shards_and_layout(tmp_path):
    state = TrainerState(step=3, config={}, data_shards=4, layout={"world_size": 6, "placement": "split"})
    state.save(tmp_path)
    back = TrainerState.load(tmp_path)
    assert back.data_shards == 4 and back.layout == {"world_size": 6, "placement": "split"}
    torch.save({"step": 1, "config": {}}, tmp_path / "trainer.pt")  # a checkpoint that did not keep them
    assert TrainerState.load(tmp_path).data_shards == 0 and TrainerState.load(tmp_path).layout == {}


# ---------------------------------------------------------------- 2. real processes: 2 or 3 ranks, then 1


class Crash(Exception):
    """Every rank of the first launch stops at the same step: the node that held them is gone."""


def _optimizer_state(trainer: Trainer) -> dict[str, Any]:
    """Each local net's AdamW ``exp_avg`` of every parameter, whole (ZeRO 1-2: gathered over the net's group, a
    collective), and its LR."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out: dict[str, Any] = {}
    for name, engine in sorted(trainer.engines.items()):
        stage = engine.engine.zero_optimization_stage() if isinstance(engine, DeepSpeedEngine) else 0
        if stage == 3:  # not read here: it cannot be resharded
            continue
        if stage in (1, 2):
            # DeepSpeed links each parameter to its slice of the partitions' optimizer state after its first step,
            # when AdamW has made the state of only the first param group: linked again, every group's is read
            engine.engine.optimizer._hp_optimizer_states_linked = False
            engine.engine.optimizer._lazy_init_hp_params_optimizer_state()
            state = {n: safe_get_full_optimizer_state(p, "exp_avg") for n, p in engine.module.named_parameters()}
        else:
            optimizer = engine.engine.optimizer if isinstance(engine, DeepSpeedEngine) else engine.optimizer
            state = {n: optimizer.state[p]["exp_avg"] for n, p in engine.module.named_parameters()}
        out[name] = {"exp_avg": {n: t.detach().clone().cpu() for n, t in state.items()}, "lr": engine.lr()}
    return out


@contextlib.contextmanager
def _recorded(run: Path, rank: int, crash_at: int):
    """The Trainer of this process, instrumented: it stops (Crash) before step ``crash_at`` + 1, and writes into
    ``run`` the optimizer state after each save and after resuming, the steps it trained and what it printed."""
    originals = Trainer.save, Trainer.resume, Trainer.train_step, Trainer.log

    def save(self):
        folder = originals[0](self)
        torch.save(_optimizer_state(self), run / f"saved_{self.step}.rank{rank}.pt")
        return folder

    def resume(self, folder):
        originals[1](self, folder)
        torch.save(_optimizer_state(self), run / f"resumed.rank{rank}.pt")

    def train_step(self, x, y, **kw):
        if crash_at and self.step == crash_at:
            raise Crash(f"step {crash_at + 1}")
        with open(run / f"steps.rank{rank}.txt", "a") as f:
            f.write(f"{self.step + 1} {len(y)}\n")
        return originals[2](self, x, y, **kw)

    def log(self, text):
        originals[3](self, text)
        if self.dist.is_main:
            with open(run / "log.txt", "a") as f:
                f.write(text + "\n")

    Trainer.save, Trainer.resume, Trainer.train_step, Trainer.log = save, resume, train_step, log
    try:
        yield
    finally:
        Trainer.save, Trainer.resume, Trainer.train_step, Trainer.log = originals


def _launch_worker(rank: int, world_size: int, port: int, jobs: list[list[str]], crash_at: int) -> None:
    """Each job (config overrides) through ``run_training``, one after another, in this world's processes."""
    os.environ.update(rank_env(rank, world_size, port))
    torch.set_num_threads(1)
    info = init_distributed("cpu", backend="gloo", need_group=True)
    try:
        for overrides in jobs:
            cfg = load_config(None, overrides)
            run = Path(cfg.train.out_dir) / cfg.train.run_name
            run.mkdir(parents=True, exist_ok=True)
            with _recorded(run, rank, crash_at):
                try:
                    run_training(cfg, info)
                except Crash:
                    pass
                except ValueError as e:  # refused: what the command line prints
                    (run / f"error.rank{rank}.txt").write_text(str(e))
    finally:
        close_distributed(info)


def _shrink(tmp_path: Path, world_size: int, jobs: dict[str, list[str]], crash_at: int) -> dict[str, Path]:
    """Every job on ``world_size`` ranks until step ``crash_at`` (a checkpoint every 4 steps), then on 1 rank
    colocated with ``--train.resume=auto`` to the end. The run folders."""
    common = [*TINY, *RANKS, f"--train.out_dir={tmp_path}", "--train.device=cpu", "--train.resume=auto"]
    common += ["--train.checkpoint_every=4", "--optim.name=adamw", "--optim.lr=0.002"]
    first = [[*common, f"--train.run_name={name}", *extra] for name, extra in jobs.items()]
    start_workers(_launch_worker, (world_size, free_port(), first, crash_at), world_size)
    second = [[*job, "--dist.placement=colocated"] for job in first]
    start_workers(_launch_worker, (1, free_port(), second, 0), 1)
    return {name: tmp_path / name for name in jobs}


def _states(run: Path, pattern: str) -> dict[str, Any]:
    """The recorded optimizer states of every rank's nets (``pattern``: ``saved_8`` or ``resumed``)."""
    merged: dict[str, Any] = {}
    for path in sorted(run.glob(f"{pattern}.rank*.pt")):
        merged.update(torch.load(path))
    return merged


def _check_resumed(run: Path, *, saved_at: int, total: int, micro_batch: int, before: str, was: int) -> None:
    """The run continued on 1 rank from the checkpoint of step ``saved_at`` to ``total``: the steps it trained
    (each on the merged micro-batch), the line it printed, the optimizer state it loaded (the saved one, every
    parameter's AdamW ``exp_avg`` exactly, and the LR the schedule had reached)."""
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{total:08d}"
    assert json.loads((run / "results.json").read_text())["step"] == total
    resumed = [line.split() for line in (run / "steps.rank0.txt").read_text().splitlines()][-(total - saved_at) :]
    assert [int(s) for s, _ in resumed] == list(range(saved_at + 1, total + 1))
    assert {int(b) for _, b in resumed} == {micro_batch}
    micro = f"micro-batch {was} -> {micro_batch}" if was != micro_batch else f"micro-batch {micro_batch}"
    line = f"at step {saved_at} on 1 rank (colocated, was {before}): {micro}, global batch {micro_batch} unchanged"
    assert line in (run / "log.txt").read_text()
    saved, loaded = _states(run, f"saved_{saved_at}"), _states(run, "resumed")
    assert sorted(saved) == sorted(loaded) == ["leader", "teammate_a", "teammate_b"]
    for net in saved:
        assert loaded[net]["lr"] == saved[net]["lr"], net
        assert saved[net]["exp_avg"].keys() == loaded[net]["exp_avg"].keys()
        assert sum(float(v.abs().sum()) for v in saved[net]["exp_avg"].values()) > 0, net  # it trained
        for key, value in saved[net]["exp_avg"].items():
            assert torch.equal(loaded[net]["exp_avg"][key], value), (net, key)


@pytest.mark.slow  # starts processes
def test_two_ranks_colocated_continue_on_one(tmp_path, fmnist_root):
    """2 ranks colocated (2 data shards of 16) lose both ranks after the step-8 checkpoint; 1 rank continues with
    --train.resume=auto (micro-batch 32): torch engine (MLflow on: the change is a tag), DeepSpeed ZeRO-1 (optimizer
    partitions of 2 ranks resharded into 1)."""
    jobs = {"torch": ["--tracking.backend=mlflow"], "zero1": ["--dist.engine=deepspeed", "--dist.zero_stage=1"]}
    runs = _shrink(tmp_path, 2, {k: ["--dist.placement=colocated", *v] for k, v in jobs.items()}, crash_at=10)
    for run in runs.values():
        _check_resumed(run, saved_at=8, total=16, micro_batch=32, before="2 ranks colocated", was=16)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dist_coop").experiment_id])
    assert run.data.params["launch.world"] == "2 ranks colocated"
    assert run.data.tags["resume/1/launch.world"] == "2 ranks colocated -> 1 rank colocated"
    assert run.data.tags["resume/1/launch.micro_batch"] == "16 -> 32"


@pytest.mark.slow  # starts processes
def test_three_ranks_split_continue_on_one_colocated(tmp_path, fmnist_root):
    """3 ranks split (one net per rank, 1 data shard of 16) lose their ranks after the step-8 checkpoint; 1 rank
    holding the three nets continues (micro-batch 16): torch engine and DeepSpeed ZeRO-1."""
    jobs = {"torch": [], "zero1": ["--dist.engine=deepspeed", "--dist.zero_stage=1"]}
    runs = _shrink(tmp_path, 3, {k: ["--dist.placement=split", "--train.max_steps=12", *v] for k, v in jobs.items()}, 9)
    for run in runs.values():
        _check_resumed(run, saved_at=8, total=12, micro_batch=16, before="3 ranks split", was=16)


@pytest.mark.slow  # starts processes
def test_zero2_is_resharded_and_zero3_refused_on_another_world(tmp_path, fmnist_root):
    """2 ranks colocated, then 1: DeepSpeed ZeRO-2 continues from the step-4 checkpoint; ZeRO-3 cannot be
    resharded: its resume is refused before any step, in one line naming the group size to relaunch with, and
    the checkpoint stays as it was."""
    zero = ["--dist.placement=colocated", "--dist.engine=deepspeed", "--train.max_steps=8"]
    runs = _shrink(tmp_path, 2, {f"zero{k}": [*zero, f"--dist.zero_stage={k}"] for k in (2, 3)}, crash_at=5)
    _check_resumed(runs["zero2"], saved_at=4, total=8, micro_batch=32, before="2 ranks colocated", was=16)
    run = runs["zero3"]
    (error,) = [p.read_text() for p in run.glob("error.rank*.txt")]
    assert (
        "DeepSpeed ZeRO-3 partitions saved by 2 ranks per net cannot be loaded by 1: relaunch with 2 ranks per net"
        in error
    )
    assert "\n" not in error and not (run / "results.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert [line.split()[0] for line in (run / "steps.rank0.txt").read_text().splitlines()] == ["1", "2", "3", "4", "5"]


def test_replicas_take_their_own_statistics_or_the_mean_on_another_group_size(tmp_path):
    """BN statistics of the replicas of a net: on a group of the saved size each replica takes its own back; on
    another size every replica takes the mean of the saved ones (what evaluation measures), counts untouched."""
    saved = []
    for r in range(3):
        bn = torch.nn.BatchNorm2d(2)
        bn.running_mean.fill_(float(r)), bn.running_var.fill_(1.0 + r), bn.num_batches_tracked.fill_(7)
        saved.append(bn)
        save_replica_buffers(bn, r, tmp_path, "net")
    own = torch.nn.BatchNorm2d(2)
    own.load_state_dict(saved[0].state_dict())  # the module: group rank 0's, as a checkpoint holds it
    load_replica_buffers(own, 0, tmp_path, "net", group_size=3, saved_size=3)
    assert own.running_mean.tolist() == [0.0, 0.0]
    second = torch.nn.BatchNorm2d(2)
    load_replica_buffers(second, 2, tmp_path, "net", group_size=3, saved_size=3)
    assert second.running_mean.tolist() == [2.0, 2.0] and second.running_var.tolist() == [3.0, 3.0]
    for rank, size in ((0, 1), (1, 2)):
        shrunk = torch.nn.BatchNorm2d(2)
        shrunk.load_state_dict(saved[0].state_dict())
        load_replica_buffers(shrunk, rank, tmp_path, "net", group_size=size, saved_size=3)
        assert shrunk.running_mean.tolist() == [1.0, 1.0] and shrunk.running_var.tolist() == [2.0, 2.0]
        assert shrunk.num_batches_tracked.item() == 7


# ---------------------------------------------------------------- 3. two torchrun agents, one node lost for good

ROOT = Path(__file__).resolve().parents[1]


def _agent(tmp_path: Path, index: int, port: int, cfg: list[str]) -> subprocess.Popen:
    """A torchrun agent of ``--nnodes 1:2`` with one worker, what one node runs; agent 0 hosts the rendezvous
    store (it must outlive the other node)."""
    rdzv = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "shrink"]
    rdzv += ["--rdzv_conf", f"is_host={int(index == 0)},last_call_timeout=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.Popen(
        [*cmd, "--max-restarts", "1", *rdzv, "launch/train.py", *cfg],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOGLEVEL": "INFO"},
        stdout=open(tmp_path / f"agent{index}.log", "w"),
        stderr=subprocess.STDOUT,
    )


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers at once, as a node that is lost (the agent alone would leave them)."""
    for pid in [*children(agent.pid), agent.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.wait()


@pytest.mark.slow  # starts processes
def test_node_lost_for_good_the_survivor_continues_alone(tmp_path, fmnist_root):
    """torchrun --nnodes 1:2 (c10d rendezvous), two agents of one worker each: a world of 2 ranks colocated. After
    the first checkpoint one node (its agent and its worker) is SIGKILLed and never comes back. The surviving
    agent restarts its worker in a world of 1, which resumes from the checkpoint reading both data shards
    (micro-batch 32) and finishes the epoch alone."""
    cfg = [*TINY, *RANKS, f"--train.out_dir={tmp_path}", "--train.run_name=run", "--train.device=cpu"]
    cfg += ["--train.resume=auto", "--train.checkpoint_every=4", "--dist.placement=colocated", "--dist.timeout_s=30"]
    port = free_port()
    agents = [_agent(tmp_path, 0, port, cfg)]
    try:
        time.sleep(1)  # agent 0 binds the rendezvous store first
        agents.append(_agent(tmp_path, 1, port, cfg))
        latest = tmp_path / "run" / "checkpoints" / "latest"
        deadline = time.time() + 120
        while not latest.exists() and time.time() < deadline and all(a.poll() is None for a in agents):
            time.sleep(0.05)
        assert latest.exists(), (tmp_path / "agent0.log").read_text()[-4000:]
        _kill_node(agents[1])
        agents[0].wait(timeout=180)
    finally:
        for agent in agents:
            if agent.poll() is None:
                _kill_node(agent)
    log = (tmp_path / "agent0.log").read_text()
    assert agents[0].returncode == 0, log[-4000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["step"] == 16  # the epoch of 2 ranks
    resumed = re.search(r"resumed from \S+ at step (\d+) on 1 rank", log)
    assert resumed and 4 <= int(resumed.group(1)) < 16, log[-4000:]
    assert "on 1 rank (colocated, was 2 ranks colocated): micro-batch 16 -> 32, global batch 32 unchanged" in log
