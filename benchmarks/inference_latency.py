"""Latency per depth at batch 1 and 64 next to the FLOPs ratio, and the cost of a depth switch.

    python benchmarks/inference_latency.py [--run runs/quickstart --net teammate_a] [--model resnet32 --width 8]

For each depth s: latency(s)/latency(1) against FLOPs(s)/FLOPs(1) — the gap is what the FLOPs
count does not see (fixed per-call costs, small kernels); and the median time of ``set_depth``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dist_coop.infer.profile import profile_net
from dist_coop.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="", help="a trained run (default: a fresh net of --model)")
    parser.add_argument("--net", default="teammate_a")
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        from dist_coop.run import load_run

        run = load_run(args.run, nets=[args.net])
        net, shape = run.nets[args.net], run.inputs.shape
    else:
        net = build_model(args.model, [0.25, 0.5, 0.75, 1.0], width=args.width, in_channels=args.in_channels)
        shape = (args.in_channels, args.size, args.size)
    p = profile_net(net, shape, batch_sizes=(1, 64), repeats=args.repeats, warmup=5)
    full = p.by_depth()[1.0]
    print(
        f"{'s':>5}{'GFLOPs':>9}{'FLOPs/full':>11}{'ms b1':>8}{'lat/full b1':>12}{'gap b1':>8}{'ms b64':>9}{'lat/full b64':>13}{'gap b64':>9}"
    )
    for d in p.depths:
        fr = d.gflops / full.gflops
        r1, r64 = d.latency_ms[1] / full.latency_ms[1], d.latency_ms[64] / full.latency_ms[64]
        print(
            f"{d.s:>5g}{d.gflops:>9.4f}{fr:>11.3f}{d.latency_ms[1]:>8.3f}{r1:>12.3f}{r1 - fr:>+8.3f}{d.latency_ms[64]:>9.2f}{r64:>13.3f}{r64 - fr:>+9.3f}"
        )
    switches = []
    factors = list(net.scaling_factors)
    for i in range(2000):
        t = time.perf_counter()
        net.set_depth(factors[i % len(factors)])
        switches.append(time.perf_counter() - t)
    print(
        f"depth switch (set_depth): median {statistics.median(switches) * 1e6:.1f} us "
        f"= {statistics.median(switches) * 1e3 / full.latency_ms[1] * 100:.2f} % of one batch-1 forward at full depth"
    )
    print(f"device {p.device}, threads {torch.get_num_threads()}, input {list(shape)}")


if __name__ == "__main__":
    main()
