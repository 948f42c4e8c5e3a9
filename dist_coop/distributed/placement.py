"""Where the nets live: pure planning (no process groups), unit-testable in one process.

``split`` with world size N * D (N nets): ranks [i D, (i + 1) D) hold net i, one engine whose
data-parallel group is those D ranks. Ranks r, r + D, ... form *exchange group* r: they read the
same samples with the same augmentation and all-gather their full-depth logits.
``colocated``: every rank holds every net, data parallel over all ranks, no exchange.
``auto``: split when the world size is a positive multiple of the number of nets (and > 1), else colocated.
Either way rank 0 states the layout at start (``placement_line``): with ``data.batch_size`` per rank, a net's
global batch is its data-parallel ranks x the micro-batch, so the same config trains another global batch on
another world size. ``split`` on a world that is not a multiple of the nets is refused naming the nearest that are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dist_coop.choices import PLACEMENTS


@dataclass(frozen=True)
class Placement:
    kind: str  # split | colocated
    world_size: int
    net_names: tuple[str, ...]
    requested: str = ""  # dist.placement as asked for (auto | split | colocated); "" = kind

    @property
    def group_size(self) -> int:
        """D: ranks per net (split) or the whole world (colocated)."""
        return self.world_size // len(self.net_names) if self.kind == "split" else self.world_size

    def nets_of(self, rank: int) -> tuple[str, ...]:
        if self.kind == "colocated":
            return self.net_names
        return (self.net_names[rank // self.group_size],)

    def net_ranks(self, name: str) -> tuple[int, ...]:
        """The data-parallel group of net ``name``."""
        if self.kind == "colocated":
            return tuple(range(self.world_size))
        i, d = self.net_names.index(name), self.group_size
        return tuple(range(i * d, (i + 1) * d))

    def exchange_index(self, rank: int) -> int:
        """Which exchange group ``rank`` is in; equals the data shard it reads."""
        return rank % self.group_size if self.kind == "split" else rank

    @property
    def num_shards(self) -> int:
        """Distinct data streams: one per exchange group (split) or per rank (colocated)."""
        return self.group_size

    def exchange_ranks(self, index: int) -> tuple[int, ...]:
        """Members of exchange group ``index``, in net order (split only)."""
        return tuple(index + i * self.group_size for i in range(len(self.net_names)))


def nearest_split_sizes(world_size: int, num_nets: int) -> tuple[int, ...]:
    """The multiples of ``num_nets`` next to ``world_size``: the one below (if any) and the one above."""
    below = world_size // num_nets * num_nets
    return tuple(n for n in (below, below + num_nets) if n >= num_nets and n != world_size)


def _ranks(ranks: Sequence[int]) -> str:
    """``"ranks 0-3"`` or ``"rank 5"``: a run of consecutive ranks."""
    return f"ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0]}"


def plan_placement(kind: str, world_size: int, net_names: Sequence[str]) -> Placement:
    """Check that ``world_size`` can serve ``kind`` for these nets; a clear error before any work."""
    if kind not in PLACEMENTS:
        raise ValueError(f"dist.placement must be one of {list(PLACEMENTS)}, got {kind!r}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    n, requested = len(net_names), kind
    if kind == "auto":
        kind = "split" if world_size > 1 and world_size % n == 0 else "colocated"
    if kind == "split" and world_size % n != 0:
        sizes = " or ".join(map(str, nearest_split_sizes(world_size, n)))
        raise ValueError(
            f"dist.placement: split needs a world size that is a multiple of the {n} nets "
            f"({', '.join(net_names)}), got {world_size}: use {sizes} ranks, or dist.placement: colocated "
            f"(every rank holds every net)"
        )
    return Placement(kind, world_size, tuple(net_names), requested)


def placement_line(placement: Placement, micro_batch: int) -> str:
    """What rank 0 prints at start: the layout, why it was chosen, and each net's global batch.

    ``placement: colocated on 8 ranks (auto: 8 is not a multiple of the 3 nets; split needs 6 or 9): every rank
    holds leader, teammate_a, teammate_b; each net's global batch 8 x 128 = 1024``.
    """
    p, n = placement, len(placement.net_names)
    ranks = f"{p.world_size} rank{'s' if p.world_size != 1 else ''}"
    if p.requested != "auto":
        why = f"dist.placement {p.kind}"
    elif p.kind == "split":
        why = f"auto: {p.world_size} = {n} nets x {p.group_size} rank{'s' if p.group_size != 1 else ''}"
    elif p.world_size == 1:
        why = "auto: one process holds every net"
    else:
        sizes = " or ".join(map(str, nearest_split_sizes(p.world_size, n)))
        why = f"auto: {p.world_size} is not a multiple of the {n} nets; split needs {sizes}"
    if p.kind == "split":
        held = ", ".join(f"{name} on {_ranks(p.net_ranks(name))}" for name in p.net_names)
    else:
        held = f"{'every rank' if p.world_size > 1 else 'rank 0'} holds {', '.join(p.net_names)}"
    batch = f"{p.num_shards} x {micro_batch} = {p.num_shards * micro_batch}"
    return f"placement: {p.kind} on {ranks} ({why}): {held}; each net's global batch {batch}"


def check_engine_support(placement: Placement, engine: str, zero_stage: int) -> None:
    """Refuse combinations DeepSpeed cannot run, before any work.

    DeepSpeed 0.19's ZeRO-3 records each rank's module trace in the first step and asserts it is
    identical across the *global* group; in the split placement the Leader's trace (one forward)
    differs from the Teammates' (one per depth), so it fails. ZeRO 0-2 split and ZeRO-3
    colocated work (tested).
    """
    if engine == "deepspeed" and zero_stage == 3 and placement.kind == "split" and placement.world_size > 1:
        raise ValueError(
            "dist.zero_stage 3 with placement split is not supported: DeepSpeed ZeRO-3 requires every rank to run "
            "the same module trace, and the nets of a split placement differ. Use zero_stage 0-2 with split, "
            "or placement colocated with ZeRO-3."
        )
