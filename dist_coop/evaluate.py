"""Evaluation of every net at every depth, and the per-depth results table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_coop.coop.task import NetSpec
from dist_coop.infer.cost import DepthCost
from dist_coop.models.adaptive import AdaptiveNet


@torch.no_grad()
def evaluate_depth(
    net: AdaptiveNet, batches: Iterable[tuple[Tensor, Tensor]], s: float, autocast=None
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean CE loss of depth ``s`` (using depth ``s``'s BN statistics)."""
    was_training = net.training
    net.eval()
    correct1 = correct5 = 0
    loss_sum, n = 0.0, 0
    try:
        with net.at_depth(s):
            for x, y in batches:
                with autocast() if autocast else torch.autocast("cpu", enabled=False):
                    logits = net(x)
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
                hit = top == y[:, None]
                correct1 += hit[:, 0].sum().item()
                correct5 += hit.any(dim=1).sum().item()
                n += len(y)
    finally:
        net.train(was_training)
    if n == 0:
        raise ValueError("evaluation got no samples")
    return {"acc1": 100.0 * correct1 / n, "acc5": 100.0 * correct5 / n, "loss": loss_sum / n}


def evaluate_all(
    nets: Mapping[str, AdaptiveNet], specs: Sequence[NetSpec], batches_fn, autocast=None, *, which: str = "all"
) -> dict[str, float]:
    """``{"val/acc1/teammate_a@0.25": ..., ...}`` for every net at every depth it is evaluated at.

    ``batches_fn()`` returns a fresh iterable over the validation batches. ``which`` is
    ``"all"``, ``"trained"`` or ``"untrained"``: depths no loss term trains (the Leader's
    sub-nets) have BN statistics only after ``recalibrate_bn``, so they are evaluated at the end.
    """
    metrics = {}
    for spec in specs:
        for s in spec.eval_depths:
            if which != "all" and (s in spec.trained_depths) != (which == "trained"):
                continue
            for key, value in evaluate_depth(nets[spec.name], batches_fn(), s, autocast).items():
                metrics[f"val/{key}/{spec.metric(s)}"] = value
    return metrics


def results_table(
    specs: Sequence[NetSpec], metrics: Mapping[str, float], costs: Mapping[str, Mapping[float, DepthCost]]
) -> str:
    """One row per (net, depth): blocks, GFLOPs, params, top-1, top-5, loss; * marks untrained depths."""
    header = f"{'net':<14}{'s':>6}{'blocks':>8}{'GFLOPs':>10}{'params':>10}{'top-1 %':>9}{'top-5 %':>9}{'loss':>9}"
    lines = [header, "-" * len(header)]
    for spec in specs:
        for s in spec.eval_depths:
            c = costs[spec.name][s]
            m = spec.metric(s)
            mark = "" if s in spec.trained_depths else "*"
            lines.append(
                f"{spec.role or spec.name:<14}{mark:>1}{s:>5g}{c.blocks:>8}{c.gflops:>10.4f}{c.params:>10,}"
                f"{metrics[f'val/acc1/{m}']:>9.2f}{metrics[f'val/acc5/{m}']:>9.2f}{metrics[f'val/loss/{m}']:>9.3f}"
            )
    if any(s not in spec.trained_depths for spec in specs for s in spec.eval_depths):
        lines.append("* no loss term trains this depth: the net truncated, BN statistics recalibrated")
    return "\n".join(lines)
