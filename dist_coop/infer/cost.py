"""Cost of each depth: forward FLOPs (``torch.utils.flop_counter``) and the parameters that run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_coop.models.adaptive import AdaptiveNet


@dataclass(frozen=True)
class DepthCost:
    s: float
    blocks: int  # residual blocks that run
    gflops: float  # forward FLOPs per image / 1e9 (a multiply-add counts 2)
    params: int  # parameters used by this depth's forward


def forward_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward of ``net`` on ``x`` (counted by PyTorch's FlopCounterMode)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


def active_params(net: AdaptiveNet, s: float) -> int:
    """Parameters read by depth ``s``: skipped blocks excluded, private BN and a private classifier counted for one depth.

    ``net`` holds its whole parameters (not a ZeRO-3 partition: the trainer measures costs on a plain copy).
    """
    skipped = set()
    for stage, stage_mask in zip(net.stages, net.masks[s]):
        for keep, block in zip(stage_mask, stage):
            if not keep:
                skipped.update(id(p) for p in block.parameters())
    per_depth = {id(p) for p in net.per_depth_parameters()}  # one row per depth: one row is read
    total = 0
    for module in net.modules():
        for p in module.parameters(recurse=False):
            if id(p) in skipped:
                continue
            rows = p.shape[0] if id(p) in per_depth else 1
            total += p.numel() // rows
    return total


def depth_costs(net: AdaptiveNet, input_shape: Sequence[int]) -> dict[float, DepthCost]:
    """``{s: DepthCost}`` for one image of shape (C, H, W) at every depth of ``net``."""
    first = next(net.parameters())
    x = torch.zeros(1, *input_shape, device=first.device, dtype=first.dtype)
    was_training = net.training
    net.eval()
    costs = {}
    try:
        for s in net.scaling_factors:
            with net.at_depth(s):
                costs[s] = DepthCost(s, net.num_blocks(s), forward_flops(net, x) / 1e9, active_params(net, s))
    finally:
        net.train(was_training)
    return costs


def cost_metrics(metric_name, net: AdaptiveNet, input_shape: Sequence[int]) -> dict[str, float]:
    """``cost/{gflops,params,blocks}/<net>@<s>`` for every depth; ``metric_name(s)`` names a depth."""
    out = {}
    for s, c in depth_costs(net, input_shape).items():
        m = metric_name(s)
        out.update(
            {f"cost/gflops/{m}": c.gflops, f"cost/params/{m}": float(c.params), f"cost/blocks/{m}": float(c.blocks)}
        )
    return out
