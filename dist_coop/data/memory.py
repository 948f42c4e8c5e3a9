"""An in-memory dataset served as deterministic, resumable batches.

The order of epoch e is a permutation drawn from a generator seeded with (seed, e), and the
augmentation of step t from (seed, e, t): batch (e, t) is the same on every run, so a resumed run
replays the uninterrupted one exactly and the trainer can start mid-epoch from ``start``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field

import torch
from torch import Tensor

from dist_coop.data.augment import augment_step, epoch_order, normalize
from dist_coop.data.batches import Sharded


@dataclass(frozen=True)
class Split:
    images: Tensor  # (N, C, H, W) uint8
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int) -> Split:
        """The first ``n`` samples (all when n is 0 or larger than the split)."""
        return self if n <= 0 or n >= len(self) else Split(self.images[:n], self.labels[:n])


@dataclass(eq=False, repr=False)
class MemoryBatches(Sharded):
    """Batches of a ``Split`` for training (shuffled, augmented, full batches) or evaluation (in order, all).

    Data shard k of n (``sharded(k, n)``): in training, step t of an epoch takes a global batch of
    ``batch_size * n`` samples of the epoch's permutation and shard k reads the k-th ``batch_size`` of
    it; its augmentation is seeded by (seed, epoch, t, k), so every rank reading shard k (an exchange
    group) sees the same pixels. In evaluation shard k reads the k-th contiguous chunk of the split, so
    the shards together cover every sample exactly once.
    """

    split: Split
    _: KW_ONLY
    batch_size: int
    mean: Sequence[float]
    std: Sequence[float]
    train: bool
    seed: int = 0
    padding: int = 0
    augment: bool = True
    device: torch.device | str = "cpu"
    shard: int = 0
    num_shards: int = 1
    skipped: int = field(default=0, init=False)  # nothing in memory is corrupt (the Batches interface)

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard {self.shard} is not in [0, {self.num_shards})")
        if self.train and len(self.split) < self.batch_size * self.num_shards:
            raise ValueError(
                f"data.batch_size {self.batch_size} x {self.num_shards} data shards is larger than the training "
                f"split ({len(self.split)} samples)"
            )
        self.mean, self.std, self.device = tuple(self.mean), tuple(self.std), torch.device(self.device)

    def _eval_range(self) -> range:
        n, k = len(self.split), self.num_shards
        chunk = -(-n // k)
        return range(min(n, self.shard * chunk), min(n, (self.shard + 1) * chunk))

    def __len__(self) -> int:
        """Steps per epoch: training drops the last partial global batch, evaluation keeps it."""
        if self.train:
            return len(self.split) // (self.batch_size * self.num_shards)
        return -(-len(self._eval_range()) // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start + 1, ...`` of ``epoch`` as (x float (B, C, H, W), y int64 (B,))."""
        n, b = len(self.split), self.batch_size
        if self.train:
            order = epoch_order(n, self.seed, epoch)
            offset, stride = self.shard * b, b * self.num_shards
        else:
            rows = self._eval_range()
            order = torch.arange(rows.start, rows.stop)
            offset, stride = 0, b
        for step in range(start, len(self)):
            idx = order[step * stride + offset : step * stride + offset + b]
            x = self.split.images[idx].to(self.device, non_blocking=True)
            y = self.split.labels[idx].to(self.device, non_blocking=True)
            x = normalize(x, self.mean, self.std)
            if self.train and self.augment:
                x = augment_step(x, self.padding, seed=self.seed, epoch=epoch, step=step, shard=self.shard)
            yield x, y
