"""What the in-memory and the webdataset batches share: the ``Batches`` interface the trainer reads, and
being read as one data shard of several.

Both are dataclasses whose constructor checks their settings; ``sharded`` copies one with another
``shard`` / ``num_shards`` through that constructor, so every other setting is kept, the check runs
again (a split too small for that many data shards is refused) and per-stream counters start afresh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol, TypeVar

from torch import Tensor

B = TypeVar("B", bound="Sharded")


class Batches(Protocol):
    """Batches of a split (``MemoryBatches`` in memory, ``ShardBatches`` streamed from shards)."""

    batch_size: int
    mean: tuple[float, ...]  # the per-channel normalisation applied to every image
    std: tuple[float, ...]
    skipped: int  # corrupt samples skipped so far (data.on_corrupt: skip; always 0 in memory)

    def __len__(self) -> int:
        """Steps per epoch (training: the same on every data shard)."""
        ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start + 1, ...`` of ``epoch``: (x float (B, C, H, W) normalised, y int64 (B,))."""
        ...

    def sharded(self, shard: int, num_shards: int) -> Batches:
        """The same batches reading data shard ``shard`` of ``num_shards``."""
        ...


class Sharded:
    """Mixin for the batch dataclasses (``MemoryBatches``, ``ShardBatches``), which have ``shard`` and
    ``num_shards`` fields."""

    shard: int
    num_shards: int

    def sharded(self: B, shard: int, num_shards: int) -> B:
        """The same batches reading data shard ``shard`` of ``num_shards`` (how each class splits: its docstring)."""
        return dataclasses.replace(self, shard=shard, num_shards=num_shards)
