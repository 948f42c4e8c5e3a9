"""Share of step time spent in the soft-target all-gather, split placement on 3 CPU ranks (gloo).

Each rank holds one net (Leader, Teammate A, Teammate B), runs real training steps of the given
config, and times its ``all_gather`` of (B, C) float32 logits separately.

    python benchmarks/exchange.py --config configs/quickstart.yaml [--steps 10] [--ranks 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dist_coop.config import load_config
from dist_coop.data import build_data
from dist_coop.distributed.env import close_distributed, init_distributed
from dist_coop.ports import free_port
from dist_coop.trainer import Trainer


def worker(
    rank: int, world: int, port: int, config: str, overrides: list[str], steps: int, warmup: int, out: dict
) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    cfg = load_config(config, ["--tracking.backend=none", "--dist.placement=split", "--train.device=cpu", *overrides])
    info = init_distributed("cpu", backend="gloo", need_group=True)
    data = build_data(cfg.data, seed=0)
    trainer = Trainer(cfg, data, run_dir="/tmp/dist_coop_exchange", dist=info)
    batches = trainer.train_data.epoch(0)
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    trainer.exchange.seconds = 0.0
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(batches))
    total = time.perf_counter() - t
    # the transfer alone: the same all-gather right after a barrier (no waiting for slower peers)
    z = torch.randn(cfg.data.batch_size, cfg.model.num_classes)
    pure = []
    for _ in range(50):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        trainer.exchange({list(trainer.engines)[0]: z})
        pure.append(time.perf_counter() - t0)
    out[rank] = (list(trainer.engines)[0], total / steps, trainer.exchange.seconds / steps - 0.0, sorted(pure)[25])
    close_distributed(info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=3)
    args, overrides = parser.parse_known_args()
    port = free_port()
    manager = torch.multiprocessing.Manager()
    out = manager.dict()
    torch.multiprocessing.spawn(
        worker, args=(args.ranks, port, args.config, overrides, args.steps, args.warmup, out), nprocs=args.ranks
    )
    cfg = load_config(args.config, overrides)
    print(
        f"split placement, {args.ranks} CPU ranks (gloo, 1 thread each), batch {cfg.data.batch_size}, {cfg.model.num_classes} classes"
    )
    print(f"{'rank':<6}{'net':<12}{'step ms':>10}{'in all-gather ms':>18}{'share':>8}{'transfer ms':>13}{'share':>8}")
    for rank in sorted(out.keys()):
        net, step, ex, pure = out[rank]
        print(
            f"{rank:<6}{net:<12}{step * 1e3:>10.1f}{ex * 1e3:>18.2f}{100 * ex / step:>7.2f}%{pure * 1e3:>13.3f}{100 * pure / step:>7.3f}%"
        )
    print("'in all-gather' includes waiting for slower peers (the Leader runs one depth, Teammates four);")
    print("'transfer' is the median of 50 all-gathers of the same logits right after a barrier.")


if __name__ == "__main__":
    main()
