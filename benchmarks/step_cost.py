"""Cost of one cooperative training step next to a plain single-net step on the same batch.

Reports wall time (median of repeated steps after warm-up) and FLOPs (forward + backward,
counted by torch.utils.flop_counter) of both, and their ratios: time ratio / FLOPs ratio > 1
is overhead beyond FLOPs (more, smaller kernels; Python; optimizer steps of three nets).

    python benchmarks/step_cost.py --config configs/quickstart.yaml [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_coop.config import load_config
from dist_coop.coop.losses import cross_entropy
from dist_coop.data import build_data
from dist_coop.dist.env import single_process
from dist_coop.models.registry import build_from_config
from dist_coop.optim import build_optimizer
from dist_coop.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, n: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def flops_of(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    args, overrides = parser.parse_known_args()
    cfg = load_config(args.config, [f"--train.device={args.device}", "--tracking.backend=none", *overrides])
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = single_process(cfg.train.device)
    device = dist.device
    data = build_data(cfg.data, seed=0, device=device)
    trainer = Trainer(cfg, data, run_dir="/tmp/dist_coop_bench", dist=dist)
    x, y = next(data.train.epoch(0))
    x, y = x.to(device), y.to(device)

    plain = build_from_config(cfg.model, cfg.coop.scaling_factors).to(device)
    opt = build_optimizer(plain, cfg.optim)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        with trainer.autocast():
            loss = cross_entropy(plain(x), y)
        loss.backward()
        opt.step()

    def coop_step() -> None:
        trainer.train_step(x, y)

    t_plain = time_steps(plain_step, args.steps, args.warmup, device)
    t_coop = time_steps(coop_step, args.steps, args.warmup, device)
    f_plain, f_coop = flops_of(plain_step), flops_of(coop_step)
    nets = ", ".join(s.name for s in trainer.task.specs)
    print(
        f"device {device}, threads {torch.get_num_threads()}, batch {len(y)}, model {cfg.model.name} width {cfg.model.width or 'default'}, amp {cfg.optim.amp}"
    )
    print(f"cooperative step: nets [{nets}], depths {list(cfg.coop.scaling_factors)}")
    print(f"{'':<18}{'ms/step':>10}{'GFLOP/step':>12}{'samples/s':>11}")
    print(f"{'plain (1 net, s=1)':<18}{t_plain * 1e3:>10.1f}{f_plain / 1e9:>12.2f}{len(y) / t_plain:>11.0f}")
    print(f"{'cooperative':<18}{t_coop * 1e3:>10.1f}{f_coop / 1e9:>12.2f}{len(y) / t_coop:>11.0f}")
    print(
        f"time ratio {t_coop / t_plain:.2f}x, FLOPs ratio {f_coop / f_plain:.2f}x, overhead beyond FLOPs {(t_coop / t_plain) / (f_coop / f_plain):.2f}x"
    )


if __name__ == "__main__":
    main()
