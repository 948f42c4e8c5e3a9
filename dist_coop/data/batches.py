"""What the in-memory and the webdataset batches share: the ``Batches`` interface the trainer reads, and
being read as one data shard of several.

Both are dataclasses whose constructor checks their settings; ``sharded`` copies one with another
``shard`` / ``num_shards`` through that constructor, so every other setting is kept, the check runs
again (a split too small for that many data shards is refused) and per-stream counters start afresh.

A run's data is split in *virtual* data shards, as many as its exchange groups when it first started; a run
resumed with fewer exchange groups gives each several of them (``virtual_shards``): every step concatenates one
batch of each (``Merged``), so each step still sees exactly the samples and pixels of the original layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

import torch
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


class Merged:
    """Several data shards read as one (training): step t is the concatenation of step t of each part, in order.

    The parts are data shards of one split with the same batch size (``sharded`` copies of one ``Batches``), so
    they have the same number of steps; each keeps its own augmentation seed (its data shard index).
    """

    def __init__(self, parts: Sequence[Batches]) -> None:
        if not parts:
            raise ValueError("Merged needs at least one data shard")
        self.parts = tuple(parts)
        self.batch_size = sum(p.batch_size for p in self.parts)  # the micro-batch of the ranks that read them
        self.mean, self.std = self.parts[0].mean, self.parts[0].std

    @property
    def skipped(self) -> int:
        return sum(p.skipped for p in self.parts)

    def __len__(self) -> int:
        return len(self.parts[0])

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start + 1, ...`` of ``epoch``: (x (sum of the parts' B, C, H, W), y)."""
        streams = [p.epoch(epoch, start) for p in self.parts]
        for batches in zip(*streams, strict=True):
            xs, ys = zip(*batches)
            yield torch.cat(xs), torch.cat(ys)


def virtual_shards(batches: Batches, shard: int, num_shards: int, virtual: int) -> Batches:
    """Data shard ``shard`` of ``num_shards`` when the data is split in ``virtual`` virtual data shards:
    virtual shards ``shard * k .. (shard + 1) * k - 1`` (k = virtual / num_shards) merged, one batch of each
    per step. With ``virtual == num_shards`` simply ``batches.sharded(shard, num_shards)``."""
    if virtual < 1 or virtual % num_shards:
        raise ValueError(f"{num_shards} data shards cannot share {virtual} virtual data shards evenly")
    per = virtual // num_shards
    if per == 1:
        return batches.sharded(shard, num_shards)
    return Merged([batches.sharded(v, virtual) for v in range(shard * per, (shard + 1) * per)])
