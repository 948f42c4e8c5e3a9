"""Process groups of a placement, the soft-target exchange, and gathers for metrics.

Every helper is a no-op at world size 1 (no process group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dist_coop.distributed.env import DistInfo
from dist_coop.distributed.placement import Placement


@dataclass
class Groups:
    """The process groups this rank belongs to (None at world size 1)."""

    net: dict[str, Any] = field(default_factory=dict)  # net name -> its data-parallel group
    exchange: Any = None  # this rank's exchange group (split only)
    singleton: Any = None  # {rank}: DeepSpeed's model-parallel group of size 1


def build_groups(placement: Placement, info: DistInfo) -> Groups:
    """Create every group in the same order on every rank (``new_group`` is collective).

    Each group's collectives give up after ``info.timeout_s`` (``dist.timeout_s``), like the default group's.
    """
    groups = Groups()
    if not info.initialized:
        return groups
    timeout = timedelta(seconds=info.timeout_s)
    if placement.kind == "colocated":
        world = dist.group.WORLD
        groups.net = {name: world for name in placement.net_names}
    else:
        for name in placement.net_names:
            g = dist.new_group(list(placement.net_ranks(name)), timeout=timeout)
            if name in placement.nets_of(info.rank):
                groups.net[name] = g
        for index in range(placement.group_size):
            g = dist.new_group(list(placement.exchange_ranks(index)), timeout=timeout)
            if index == placement.exchange_index(info.rank):
                groups.exchange = g
    for r in range(info.world_size):
        g = dist.new_group([r], timeout=timeout)
        if r == info.rank:
            groups.singleton = g
    return groups


class LogitExchange:
    """All-gather of full-depth logits within an exchange group: each net gets its peers' soft targets.

    Only (B, C) float32 logits travel, detached: nothing bigger, and no gradient crosses ranks.
    In the colocated placement every net is local and the exchange is the identity.
    """

    def __init__(self, placement: Placement, groups: Groups, info: DistInfo) -> None:
        self.placement, self.group, self.info = placement, groups.exchange, info
        self.seconds = 0.0  # time spent in the all-gather (benchmarks read it)

    def __call__(self, local: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.placement.kind == "colocated" or self.group is None:
            return dict(local)
        import time

        ((name, z),) = local.items()
        z = z.detach().float().contiguous()
        out = [torch.empty_like(z) for _ in self.placement.net_names]
        t = time.perf_counter()
        dist.all_gather(out, z, group=self.group)
        self.seconds += time.perf_counter() - t
        gathered = dict(zip(self.placement.net_names, out))
        gathered[name] = local[name]  # keep the local one as it was (same values)
        return gathered


def gather_to_main(info: DistInfo, payload: dict[str, float]) -> dict[str, float]:
    """Merge every rank's metrics dict on global rank 0 (others get {})."""
    if not info.initialized or info.world_size == 1:
        return dict(payload)
    parts: list[Any] = [None] * info.world_size if info.is_main else None  # type: ignore[assignment]
    dist.gather_object(payload, parts, dst=0)
    if not info.is_main:
        return {}
    merged: dict[str, float] = {}
    for part in parts:
        merged.update(part)
    return merged


def all_reduce_sum(values: list[float], group: Any, device: torch.device) -> list[float]:
    """Sum a few numbers over ``group`` (no-op without one)."""
    if group is None or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def average_in_place(tensors: Sequence[Tensor], group: Any) -> None:
    """Replace each tensor by its mean over ``group``: one all-reduce of them all, flattened."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    with torch.no_grad():
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def average_buffers(module: torch.nn.Module, group: Any) -> None:
    """Average ``module``'s floating-point buffers (BN running statistics) over ``group``, in place (no-op
    without one). Each replica of a net gathers BN statistics on its own shard of the data; averaged, every
    replica holds the same ones, so a sharded evaluation measures one model: the one that is saved."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        average_in_place(buffers, group)


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


def all_reduce_world(t: Tensor, info: DistInfo) -> Tensor:
    """Sum ``t`` over every rank in place, so every rank decides the same (no-op at world size 1)."""
    if info.initialized and info.world_size > 1:
        dist.all_reduce(t)
    return t


def broadcast_text(text: str, info: DistInfo) -> str:
    """Rank 0's ``text`` on every rank (a decision, or an error every rank must raise alike)."""
    if not (info.initialized and info.world_size > 1):
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]
