"""Datasets and batch streams. ``build_data`` turns the data config into train/val batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_coop.data import fashion_mnist
from dist_coop.data.memory import MemoryBatches, Split


@dataclass(frozen=True)
class Data:
    train: MemoryBatches
    val: MemoryBatches
    in_channels: int
    num_classes: int
    classes: tuple[str, ...]


def build_data(cfg, *, seed: int, device: torch.device | str = "cpu") -> Data:
    """Train and validation batches for ``cfg`` (a ``DataConfig``)."""
    if cfg.dataset != "fashion_mnist":  # config validation already restricts the names
        raise ValueError(f"data.dataset: unknown dataset {cfg.dataset!r}")
    train = Split(*fashion_mnist.load_split("train", cfg.root)).take(cfg.train_subset)
    val = Split(*fashion_mnist.load_split("test", cfg.root)).take(cfg.val_subset)
    common = dict(mean=fashion_mnist.MEAN, std=fashion_mnist.STD, device=device)
    return Data(
        train=MemoryBatches(
            train,
            batch_size=cfg.batch_size,
            train=True,
            seed=seed,
            padding=cfg.crop_padding,
            augment=cfg.augment,
            **common,
        ),
        val=MemoryBatches(val, batch_size=cfg.eval_batch_size, train=False, **common),
        in_channels=1,
        num_classes=len(fashion_mnist.CLASSES),
        classes=fashion_mnist.CLASSES,
    )
