"""Workers for the multi-process tests: real processes, gloo, the real Trainer."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from collections.abc import Callable

import torch

from dist_coop.data import build_data
from dist_coop.distributed.env import close_distributed, init_distributed
from dist_coop.ports import free_port  # noqa: F401  (imported from here by the launcher tests)
from dist_coop.trainer import Trainer
from tests.helpers import RANKS, tiny_config
from tests.helpers import TINY as TINY_ONE

TINY = [*TINY_ONE, *RANKS]  # the tiny config sized for several ranks, as overrides for the launcher tests


def run_steps(cfg, info, num_steps: int, nan_steps: tuple[int, ...] = ()) -> dict:
    """Run ``num_steps`` training steps (the batches of ``nan_steps`` made NaN); return what each rank saw and computed."""
    torch.set_num_threads(1)
    data = build_data(cfg.data, seed=cfg.train.seed, device=info.device)
    trainer = Trainer(cfg, data, run_dir=os.path.join(cfg.train.out_dir, "t"), dist=info)
    record = {
        "losses": [],
        "labels": [],
        "pixels": [],
        "nets": sorted(trainer.engines),
        "placement": trainer.placement.kind,
        "lr": [],
        "clip": [],
    }
    for step, (x, y) in enumerate(trainer.train_data.epoch(0)):
        if step == num_steps:
            break
        logs = trainer.train_step(torch.full_like(x, float("nan")) if step in nan_steps else x, y)
        record["lr"].append({name: engine.lr() for name, engine in trainer.engines.items()})
        record["losses"].append({k: v for k, v in logs.items() if k.startswith("train/loss/")})
        record["clip"].append({k: v for k, v in logs.items() if k.startswith("train/clip_coef/")})
        record["labels"].append(y.tolist())
        record["pixels"].append(float(x.double().sum()))
    record["params"] = {
        n: torch.cat([p.detach().to(torch.promote_types(p.dtype, torch.float32)).reshape(-1) for p in m.parameters()])
        for n, m in trainer.nets.items()
    }
    record["exchange_seconds"] = trainer.exchange.seconds
    record["skipped"] = dict(trainer.guard.skipped)
    return record


def children(parent: int) -> list[int]:
    """The pids of ``parent``'s child processes (a launcher's workers), sorted."""
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` of ``world_size`` meeting on 127.0.0.1:``port``."""
    env = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return {k: str(v) for k, v in env.items()}


def worker(
    rank: int, world_size: int, port: int, jobs: list[tuple[str, list[str]]], num_steps: int, nan_steps: tuple = ()
) -> None:
    """Each job (out_dir, overrides) in turn, in this one process: a Trainer per job over the same process group."""
    os.environ.update(rank_env(rank, world_size, port))
    info = init_distributed("cpu", backend="gloo", need_group=True)
    try:
        for out_dir, overrides in jobs:
            cfg = tiny_config(out_dir, *RANKS, "--train.device=cpu", *overrides)
            record = run_steps(cfg, info, num_steps, nan_steps)
            torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        close_distributed(info)


# what every worker imports anyway: the server imports it once, and each worker is forked from it
WORKER_PRELOAD = ["torch", "torch._dynamo", "deepspeed", "dist_coop.trainer", "dist_coop.run", "tests.dist_helpers"]


def start_workers(fn: Callable, args: tuple, nprocs: int) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes, joined; a worker's exception is raised here (as
    ``torch.multiprocessing.spawn``). The processes are forked from a server that has imported torch, DeepSpeed
    and the package once: a spawned interpreter pays its own imports (~5-10 s of CPU each, most of a
    multi-process test on 2 cores), and the server has run no torch op, so no thread pool is forked."""
    multiprocessing.set_forkserver_preload(WORKER_PRELOAD)  # read when the server starts: the first call
    torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def spawn_jobs(
    world_size: int, jobs: dict[str, list[str]], out_dir, num_steps: int = 3, nan_steps: tuple[int, ...] = ()
) -> dict[str, list[dict]]:
    """Run every job (name -> overrides) in the same ``world_size`` processes, one after another: the start-up of
    the processes (interpreters, torch, DeepSpeed, the process group) is paid once. Each rank's record per job."""
    dirs = {name: os.path.join(out_dir, name) for name in jobs}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    work = [(dirs[name], list(overrides)) for name, overrides in jobs.items()]
    args = (world_size, free_port(), work, num_steps, tuple(nan_steps))
    start_workers(worker, args, world_size)
    return {
        name: [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
        for name, d in dirs.items()
    }


def spawn(
    world_size: int, out_dir, overrides: list[str], num_steps: int = 3, nan_steps: tuple[int, ...] = ()
) -> list[dict]:
    """One job in ``world_size`` fresh processes (its records in ``out_dir`` itself): each rank's record."""
    return spawn_jobs(world_size, {"": overrides}, out_dir, num_steps, nan_steps)[""]
