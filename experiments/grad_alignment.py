"""How far the depths of a Teammate agree on their shared weights: the mechanism behind ``optim.lr_scale``.

A Teammate sums one loss per depth (CE and its KD terms, w(s)-weighted) on weights several depths run. Each
depth's gradient on those weights is taken separately, on the same training batches and soft targets as a
training step (every net in train mode, on copies: no BN statistics move), and the script prints, per group
of shared weights:

* the cosine between every two depths' gradients;
* ``agreement`` = |sum_s g_s| / sqrt(sum_s |g_s|^2): 1 when the depths' gradients are orthogonal, sqrt(d) when
  d depths point the same way, below 1 when they oppose each other.

``lr_scale: blocks`` divides a shared weight's LR by d, right for depths that agree (the sum is d times one
depth's gradient); for orthogonal ones the sum is sqrt(d) times one, and each depth's part of the step is
d times smaller than in a plain net.

    python experiments/grad_alignment.py RUN_DIR [--batches 8] [--net teammate_a] [--json out.json]

RUN_DIR: a run folder with a checkpoint (``dist-coop train ... --train.out_dir=...``). ``--init``: the same
measurement on the freshly initialised nets of that run's config instead (step 0).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from dist_coop.coop.task import build_task
from dist_coop.data import build_data
from dist_coop.run import load_run


def shared_groups(net) -> dict[str, list[torch.nn.Parameter]]:
    """The weights every depth runs, by place: the stem, each stage's first block, the classifier (if shared)."""
    groups = {"stem": list(net.backbone.conv1.parameters()) + list(net.backbone.bn1.parameters())}
    for i, stage in enumerate(net.stages, start=1):
        groups[f"stage{i}.block0"] = list(stage[0].parameters())
        groups[f"stage{i}.block1"] = list(stage[1].parameters()) if len(stage) > 1 else []
    fc = net.backbone.fc
    if isinstance(fc, torch.nn.Linear):
        groups["classifier"] = list(fc.parameters())
    return {k: v for k, v in groups.items() if v}


def depth_gradients(task, nets, name, x, y) -> dict[float, dict[int, torch.Tensor]]:
    """``{s: {id(p): grad}}``: net ``name``'s gradient of its depth-s terms alone."""
    soft = {n: net(x).detach() for n, net in nets.items()}  # full-depth logits, train mode
    net = nets[name]
    out = {}
    for s in task.depths(name):
        net.zero_grad(set_to_none=True)
        if s == 1.0:
            terms = task.full_terms(name, net, net(x), y, soft)
        else:
            with net.at_depth(s):
                terms = task.sub_terms(name, s, net(x), y, soft)
        sum(terms.values()).backward()
        out[s] = {id(p): p.grad.detach().clone() for p in net.parameters() if p.grad is not None}
    return out


def measure(run_dir: Path, batches: int, name: str, init: bool) -> dict:
    run = load_run(run_dir)
    cfg = run.config
    task = build_task(cfg.coop)
    if init:
        torch.manual_seed(cfg.train.seed)
        nets = {spec.name: spec.build(cfg.model, cfg.coop.scaling_factors) for spec in task.specs}
        task.set_progress(0, 1)
        task.kd_scale = task.peer_scale = 1.0  # every term at full weight: what each depth asks for
    else:
        nets = {n: copy.deepcopy(net) for n, net in run.nets.items()}
        task.set_progress(run.step, run.step)
    for net in nets.values():
        net.train()
    data = build_data(cfg.data, seed=cfg.train.seed)
    groups = shared_groups(nets[name])
    cos = defaultdict(lambda: defaultdict(list))
    agree = defaultdict(list)
    for x, y in itertools.islice(data.train.epoch(0), batches):
        grads = depth_gradients(task, nets, name, x, y)
        depths = sorted(grads)
        for group, params in groups.items():
            runs = [s for s in depths if all(id(p) in grads[s] for p in params)]  # the depths that run these weights
            flat = {s: torch.cat([grads[s][id(p)].reshape(-1) for p in params]) for s in runs}
            for a, b in itertools.combinations(runs, 2):
                cos[group][f"{a}-{b}"].append(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0).item())
            total = torch.stack(list(flat.values())).sum(0).norm().item()
            agree[group].append((total / math.sqrt(sum(v.norm().item() ** 2 for v in flat.values())), len(runs)))
    return {
        "run": str(run_dir),
        "step": 0 if init else run.step,
        "net": name,
        "batches": batches,
        "depths": len(task.depths(name)),
        "cosine": {g: {k: sum(v) / len(v) for k, v in pairs.items()} for g, pairs in cos.items()},
        "agreement": {g: sum(a for a, _ in v) / len(v) for g, v in agree.items()},
        "runs": {g: v[0][1] for g, v in agree.items()},  # how many depths run each group
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--net", default="teammate_a")
    parser.add_argument("--init", action="store_true", help="measure the freshly initialised nets (step 0)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = measure(args.run_dir, args.batches, args.net, args.init)
    d = out["depths"]
    print(f"{out['net']} at step {out['step']}, {out['batches']} batches, {d} depths")
    print("agreement |sum g| / sqrt(sum |g|^2) over the n depths that run a group: 1 = orthogonal, sqrt(n) = aligned")
    for group, value in out["agreement"].items():
        n = out["runs"][group]
        pairs = "  ".join(f"{k}: {v:+.2f}" for k, v in out["cosine"][group].items())
        print(f"  {group:15s} n={n} agreement {value:.2f} (aligned: {math.sqrt(n):.2f})   cosine {pairs}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
