"""An in-memory dataset served as deterministic, resumable batches.

The order of epoch e is a permutation drawn from a generator seeded with (seed, e), and the
augmentation of step t from (seed, e, t): batch (e, t) is the same on every run, so a resumed run
replays the uninterrupted one exactly and the trainer can start mid-epoch from ``start``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dist_coop.data.augment import normalize, random_crop_flip


@dataclass(frozen=True)
class Split:
    images: Tensor  # (N, C, H, W) uint8
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int) -> Split:
        """The first ``n`` samples (all when n is 0 or larger than the split)."""
        return self if n <= 0 or n >= len(self) else Split(self.images[:n], self.labels[:n])


class MemoryBatches:
    """Batches of a ``Split`` for training (shuffled, augmented, full batches) or evaluation (in order, all)."""

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int = 0,
        padding: int = 0,
        augment: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        if train and len(split) < batch_size:
            raise ValueError(f"data.batch_size {batch_size} is larger than the training split ({len(split)} samples)")
        self.split, self.batch_size, self.train = split, batch_size, train
        self.mean, self.std, self.seed = tuple(mean), tuple(std), seed
        self.padding, self.augment, self.device = padding, augment, torch.device(device)

    def __len__(self) -> int:
        """Steps per epoch: training drops the last partial batch, evaluation keeps it."""
        n = len(self.split)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start + 1, ...`` of ``epoch`` as (x float (B, C, H, W), y int64 (B,))."""
        n = len(self.split)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(n)
        for step in range(start, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            x = self.split.images[idx].to(self.device, non_blocking=True)
            y = self.split.labels[idx].to(self.device, non_blocking=True)
            x = normalize(x, self.mean, self.std)
            if self.train and self.augment:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + step)
                x = random_crop_flip(x, self.padding, g)
            yield x, y
