"""Cost of one cooperative training step next to a plain single-net step: time, FLOPs, activation memory.

For each net (the quick-start config's, and ``resnet18_64`` at 64x64 on synthetic data) it measures
a plain step (one net at full depth, CE) and the colocated cooperative step (Leader + Teammates
with their sub-nets, the task and torch engines driven directly) in four variants: shared work
computed once (``model.share_prefix``) off/on, times each net's loss backpropagated part by part
(``CooperativeTask.backward_local``) off/on.

* Time: median of ``--steps`` steps after ``--warmup``, at the larger batch size.
* FLOPs: forward + backward, counted by ``torch.utils.flop_counter``. Time ratio / FLOPs ratio > 1
  is overhead beyond FLOPs (more, smaller kernels; Python; optimizer steps of three nets).
* Activation memory: every variant and batch size runs in a fresh process (forked from a server that has
  imported torch once, so a measurement does not pay an interpreter start). On CPU the resident-set
  high-water mark (VmHWM) is lowered to the memory in use after one warm-up step and read again after
  the next step (the one-off allocations of a first step are not activations), with glibc's mmap
  threshold fixed at 64 KiB (``mallopt(M_MMAP_THRESHOLD)``, what ``MALLOC_MMAP_THRESHOLD_`` sets) so that
  a freed activation goes back to the system and the high-water mark follows live memory rather than the
  allocator's retention (timing runs in yet another process, with the default allocator); on CUDA
  ``max_memory_allocated`` over a step after one warm-up step. The growth is measured at two batch
  sizes: its slope (MiB per 100 samples) is activation memory; parameters, gradients and optimizer
  state do not depend on the batch and drop out.

The last two lines compare the quick-start net's cooperative step with both optimisations on
against the plain step:

    python benchmarks/step_cost.py [--config configs/quickstart.yaml] [--steps 20] [--device cpu] [--amp bf16]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import multiprocessing
import resource
import statistics
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_coop.config import load_config
from dist_coop.coop.losses import cross_entropy
from dist_coop.coop.task import CooperativeTask, net_of
from dist_coop.distributed.engine import TorchEngine
from dist_coop.distributed.env import resolve_device
from dist_coop.models.registry import build_from_config

# variant -> (model.share_prefix, backward part by part, the one net of a split-placement rank or None for the
# colocated step of every net); None: the plain step
VARIANTS = {
    "plain (1 net, s=1)": None,
    "coop naive": (False, False, None),
    "coop shared prefix": (True, False, None),
    "coop part backward": (False, True, None),
    "coop both": (True, True, None),
    "split: Teammate rank": (True, True, "teammate_a"),
}
OPTIMISED = "coop both"
SPLIT = "split: Teammate rank"
MiB = 2**20


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


def rss_high_water() -> int:
    """Bytes: this process's resident-set high-water mark (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_high_water() -> None:
    """Lower VmHWM to the current resident set (Linux: ``echo 5 > /proc/self/clear_refs``), so the step's growth is
    measured from the memory in use now, not from an earlier transient peak (imports, data, building the nets)
    that a small step may never reach. Where that is not allowed the mark stays as it was."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def build_step(cfg, variant, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """One training step of ``variant`` (engines, optimizer steps included) as a function of nothing."""
    amp = cfg.optim.amp == "bf16" or (cfg.optim.amp == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    if variant is None:
        torch.manual_seed(0)
        engine = TorchEngine(build_from_config(cfg.model, cfg.coop.scaling_factors).to(device), cfg.optim, 10**6)
        engine.module.train()

        def plain_step() -> None:
            with autocast():
                loss = cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()

        return plain_step
    task = CooperativeTask(cfg.coop)
    _, parts, only = variant
    engines = {}
    for i, spec in enumerate(task.specs):
        torch.manual_seed(i)
        if only is not None and spec.name != only:
            continue
        net = spec.build(cfg.model, cfg.coop.scaling_factors).to(device).train()
        engines[spec.name] = TorchEngine(net, cfg.optim, 10**6)
    # the split placement: the other nets' soft targets arrive by all-gather (B x C floats each)
    peers = {spec.name: torch.randn(len(y), cfg.model.num_classes, device=device) for spec in task.specs}
    exchange = dict if only is None else lambda own: {**peers, **own}

    def summed_step() -> None:
        with autocast():
            terms = task.local_terms(engines, x, y, exchange)
        totals: dict[str, torch.Tensor] = {}
        for key, value in terms.items():
            totals[net_of(key)] = totals.get(net_of(key), 0.0) + value
        for name, engine in engines.items():
            engine.backward(totals[name])
            engine.step()

    def part_step() -> None:
        def backward(name: str, loss: torch.Tensor, last: bool) -> None:
            with torch.autocast(device.type, enabled=False):
                engines[name].backward(loss, accumulate=not last)

        with autocast():
            task.backward_local(engines, x, y, exchange, backward)
        for engine in engines.values():
            engine.step()

    return part_step if parts else summed_step


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(nbytes: int) -> None:
    """Every freed block of ``nbytes`` or more is unmapped at once (glibc; elsewhere nothing changes)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, nbytes)


def worker(job: dict) -> dict:
    """One variant at one batch size, in a fresh process: activation growth of a step; time and FLOPs if asked."""
    if not job["time"]:  # memory: every freed block of 64 KiB or more is unmapped (see the module docstring)
        fix_mmap_threshold(64 * 1024)
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    variant = VARIANTS[job["variant"]]
    overrides = list(job["overrides"])
    if variant is not None:  # the split rank's ratio is to the plain step of its own net (the same net)
        overrides.append(f"--model.share_prefix={str(variant[0]).lower()}")
    cfg = load_config(job["config"], overrides)
    device = resolve_device(job["device"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(job["batch"], *job["shape"], generator=g).to(device)
    y = torch.randint(0, cfg.model.num_classes, (job["batch"],), generator=g).to(device)
    step = build_step(cfg, variant, x, y, device)
    step()  # warm-up: optimizer state, kernel caches and thread pools are allocated once, at any batch size
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        grown = torch.cuda.max_memory_allocated(device) - base
    else:
        reset_high_water()
        base = rss_high_water()
        step()
        grown = rss_high_water() - base
    out = {"grown": grown}  # bytes
    if job["time"]:
        out["seconds"] = time_steps(step, job["steps"], job["warmup"], device)
        out["flops"] = flops_of(step)
    return out


def _guarded(job: dict) -> dict:
    try:
        return worker(job)
    except BaseException:  # the child's traceback as text: the parent names the job that failed
        return {"error": traceback.format_exc()}


def forkserver() -> multiprocessing.context.BaseContext:
    """The context of processes forked from one server that has imported torch and this package: a fresh
    process per job without an interpreter start each. CUDA is never initialised in the server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: a fresh interpreter per job
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo: the optimizers and the FLOP counter import it on their first call (~2 s a process)
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "dist_coop.coop.task", "dist_coop.distributed.engine"])
    return ctx


def run_job(ctx: multiprocessing.context.BaseContext, job: dict) -> dict:
    """``worker(job)`` in a process of its own (a pool of one per job: the next job gets a fresh one)."""
    what = f"{job['variant']} at batch {job['batch']} ({'timing' if job['time'] else 'memory'})"
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            out = pool.submit(_guarded, job).result()
    except BrokenProcessPool as e:
        raise SystemExit(f"{what}: its process died ({e})") from e
    if "error" in out:
        raise SystemExit(f"{what} failed:\n{out['error'][-3000:]}")
    return out


def measure(
    ctx: multiprocessing.context.BaseContext, overrides: list[str], shape: tuple[int, ...], args
) -> dict[str, dict]:
    """Every variant of one net: time and FLOPs at the larger batch, activation MiB per 100 samples (slope)."""
    small, large = sorted(args.batches)
    results = {}
    for variant in VARIANTS:
        base = dict(variant=variant, config=args.config, overrides=overrides, shape=list(shape), device=args.device)
        base.update(threads=args.threads, steps=args.steps, warmup=args.warmup)
        lo, hi = (run_job(ctx, {**base, "batch": b, "time": False}) for b in (small, large))
        timed = run_job(ctx, {**base, "batch": large, "time": True})
        slope = (hi["grown"] - lo["grown"]) / (large - small) * 100 / MiB
        results[variant] = {**timed, "act": slope, "batch": large}
    return results


def report(title: str, results: dict[str, dict], coop) -> tuple[float, float]:
    """Print one net's table; returns (memory ratio, time beyond FLOPs) of the optimised colocated variant."""
    plain = results["plain (1 net, s=1)"]
    print(title)
    print(
        f"{'':<20}{'ms/step':>9}{'GFLOP/step':>12}{'samples/s':>11}{'act MiB/100':>13}{'mem x':>7}{'beyond FLOPs':>14}"
    )
    for variant, r in results.items():
        beyond = (r["seconds"] / plain["seconds"]) / (r["flops"] / plain["flops"])
        print(
            f"{variant:<20}{r['seconds'] * 1e3:>9.1f}{r['flops'] / 1e9:>12.2f}{r['batch'] / r['seconds']:>11.0f}"
            f"{r['act']:>13.1f}{r['act'] / plain['act']:>6.2f}x{beyond:>13.2f}x"
        )
    # the Leader's step is the plain step's (same net, CE at full depth): the rest is the Teammates'
    leader = plain["flops"] if coop.leader else 0
    naive, shared = (results[v]["flops"] - leader for v in ("coop naive", "coop shared prefix"))
    print(
        f"Teammate forward + backward: {naive / coop.teammates / 1e9:.3f} GFLOP naive, "
        f"{shared / coop.teammates / 1e9:.3f} with the shared prefix ({100 * (1 - shared / naive):.1f} % less)"
    )
    split = results[SPLIT]["act"] / plain["act"]
    print(f"split placement, one Teammate per rank (both optimisations): {split:.2f}x a plain step's memory")
    best = results[OPTIMISED]
    return best["act"] / plain["act"], (best["seconds"] / plain["seconds"]) / (best["flops"] / plain["flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--amp", default="", help="optim.amp for every variant (none | bf16 | auto); default: the config's"
    )
    parser.add_argument("--batches", type=int, nargs=2, default=[64, 128], help="two batch sizes (memory slope)")
    parser.add_argument("--r18-width", type=int, default=0, help="resnet18_64 width (0: 64 on CUDA, 8 on CPU)")
    args = parser.parse_args()
    amp = [f"--optim.amp={args.amp}"] if args.amp else []
    cfg = load_config(args.config, [f"--train.device={args.device}", *amp])
    device = resolve_device(args.device)
    from dist_coop.data import build_data

    shape = build_data(cfg.data, seed=0).input_shape
    width = args.r18_width or (64 if device.type == "cuda" else 8)
    r18 = [
        "--model.name=resnet18_64",
        f"--model.width={width}",
        "--model.in_channels=3",
        "--model.num_classes=200",
        "--coop.scaling_factors=[0.5, 1.0]",  # 2 blocks per stage: two distinct depths
    ]
    print(
        f"device {device}, threads {args.threads or torch.get_num_threads()}, batches {sorted(args.batches)} "
        f"(time at the larger), amp {cfg.optim.amp}; colocated cooperative step: "
        f"{'Leader + ' if cfg.coop.leader else ''}{cfg.coop.teammates} Teammate(s), torch engines"
    )
    ctx = forkserver()
    quick = measure(ctx, amp, shape, args)
    r18_results = measure(ctx, [*r18, *amp], (3, 64, 64), args)
    m = cfg.model
    report(f"resnet18_64 width {width}, 3x64x64, depths [0.5, 1.0]", r18_results, cfg.coop)
    ratio, beyond = report(
        f"quick-start net: {m.name} width {m.width or 'default'}, {'x'.join(map(str, shape))}, "
        f"depths {list(cfg.coop.scaling_factors)}",
        quick,
        cfg.coop,
    )
    print(f"peak memory ratio (cooperative / plain): {ratio:.2f}x")
    print(f"time beyond FLOPs: {beyond:.2f}x")


if __name__ == "__main__":
    main()
