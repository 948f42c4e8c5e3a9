"""Evaluation of every net at every depth, and the per-depth results table."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_coop.coop.task import NetSpec
from dist_coop.data import Data
from dist_coop.data.batches import Batches
from dist_coop.models.adaptive import AdaptiveNet

EVAL_SPLITS = ("val", "train")  # what a results table can be computed on (``train``: without augmentation)
# the metric prefix of each split: ``train_eval/acc1/<net>@<s>``, apart from the training loop's ``train/...`` logs
METRIC_PREFIX = {"val": "val", "train": "train_eval"}


def split_batches(data: Data, split: str) -> Batches:
    """The batches of ``split``: the validation set, or the training samples without augmentation, in order."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {list(EVAL_SPLITS)}, got {split!r}")
    return data.val if split == "val" else data.train_eval


@torch.no_grad()
def evaluate_sums(
    net: AdaptiveNet,
    batches: Iterable[tuple[Tensor, Tensor]],
    s: float,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> list[float]:
    """[top-1 hits, top-5 hits, CE loss sum, samples] of depth ``s`` (with depth ``s``'s BN statistics).

    ``forward``: what computes the logits (an engine, which may cast the inputs); ``net`` by default.
    Sums, not means, so shards of the validation set can be added up across ranks.
    """
    forward = forward or net
    was_training = net.training
    net.eval()
    c1 = c5 = n = 0
    loss_sum = 0.0
    try:
        with net.at_depth(s):
            for x, y in batches:
                with autocast() if autocast else contextlib.nullcontext():
                    logits = forward(x)
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]  # (B, 5)
                c1 += hit[:, 0].sum().item()
                c5 += hit.any(dim=1).sum().item()
                n += len(y)
    finally:
        net.train(was_training)
    return [float(c1), float(c5), loss_sum, float(n)]


def sums_to_metrics(sums: Sequence[float]) -> dict[str, float]:
    c1, c5, loss_sum, n = sums
    if n == 0:
        raise ValueError("evaluation got no samples")
    return {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss_sum / n}


def selected_depths(spec: NetSpec, which: str) -> list[float]:
    """``which``: "all", "trained" or "untrained" depths of ``spec`` (untrained ones need BN recalibration first)."""
    return [s for s in spec.eval_depths if which == "all" or (s in spec.trained_depths) == (which == "trained")]


def results_table(
    specs: Sequence[NetSpec], metrics: Mapping[str, float], costs: Mapping[str, float], split: str = "val"
) -> str:
    """One row per (net, depth): blocks, GFLOPs, params, top-1, top-5, loss; * marks untrained depths.

    ``costs`` holds ``cost/{blocks,gflops,params}/<net>@<s>`` as the trainer logs them; ``metrics`` holds
    ``<prefix>/{acc1,acc5,loss}/<net>@<s>`` (``METRIC_PREFIX[split]``), and the train split is named under the table.
    """
    rows = [(spec, s, spec.metric(s)) for spec in specs for s in spec.eval_depths]
    prefix = METRIC_PREFIX[split]
    # params: 10 wide, wider for nets of 10M+ parameters so the column never runs into GFLOPs
    pw = max([10] + [len(f"{int(costs[f'cost/params/{m}']):,}") + 2 for _, _, m in rows])
    header = f"{'net':<14}{'s':>6}{'blocks':>8}{'GFLOPs':>10}{'params':>{pw}}{'top-1 %':>9}{'top-5 %':>9}{'loss':>9}"
    lines = [header, "-" * len(header)]
    for spec, s, m in rows:
        mark = "" if s in spec.trained_depths else "*"
        lines.append(
            f"{spec.role or spec.name:<14}{mark:>1}{s:>5g}{int(costs[f'cost/blocks/{m}']):>8}{costs[f'cost/gflops/{m}']:>10.4f}"
            f"{int(costs[f'cost/params/{m}']):>{pw},}{metrics[f'{prefix}/acc1/{m}']:>9.2f}{metrics[f'{prefix}/acc5/{m}']:>9.2f}"
            f"{metrics[f'{prefix}/loss/{m}']:>9.3f}"
        )
    if any(s not in spec.trained_depths for spec in specs for s in spec.eval_depths):
        lines.append("* no loss term trains this depth: the net truncated, BN statistics recalibrated")
    if split != "val":
        lines.append("on the training samples, without augmentation (compare with the validation table: the fit gap)")
    return "\n".join(lines)
