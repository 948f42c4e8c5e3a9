"""Where the nets live: pure planning (no process groups), unit-testable in one process.

``split`` with world size N * D (N nets): ranks [i D, (i + 1) D) hold net i, one engine whose
data-parallel group is those D ranks. Ranks r, r + D, ... form *exchange group* r: they read the
same samples with the same augmentation and all-gather their full-depth logits.
``colocated``: every rank holds every net, data parallel over all ranks, no exchange.
``auto``: split when the world size is a positive multiple of the number of nets (and > 1), else colocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PLACEMENTS = ("auto", "split", "colocated")


@dataclass(frozen=True)
class Placement:
    kind: str  # split | colocated
    world_size: int
    net_names: tuple[str, ...]

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


def plan_placement(kind: str, world_size: int, net_names: Sequence[str]) -> Placement:
    """Check that ``world_size`` can serve ``kind`` for these nets; a clear error before any work."""
    if kind not in PLACEMENTS:
        raise ValueError(f"dist.placement must be one of {list(PLACEMENTS)}, got {kind!r}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    n = len(net_names)
    if kind == "auto":
        kind = "split" if world_size > 1 and world_size % n == 0 else "colocated"
    if kind == "split" and world_size % n != 0:
        raise ValueError(
            f"dist.placement: split needs a world size that is a multiple of the {n} nets "
            f"({', '.join(net_names)}): {n}, {2 * n}, {3 * n}, ...; got {world_size}. "
            "Use placement: colocated, or launch a multiple of that many processes."
        )
    return Placement(kind, world_size, tuple(net_names))


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
