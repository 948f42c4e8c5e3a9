"""Datasets and batch streams. ``build_data`` turns the data config into train/val batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dist_coop.config import DataConfig
from dist_coop.data import fashion_mnist
from dist_coop.data.batches import Batches
from dist_coop.data.memory import MemoryBatches, Split


@dataclass(frozen=True)
class Data:
    train: Batches  # MemoryBatches or ShardBatches
    val: Batches
    train_eval: Batches  # the training samples as evaluation sees them (no augmentation, in order): the fit gap
    in_channels: int
    num_classes: int
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (C, H, W) of one image as the net sees it
    calibration: Callable[[int], Iterator[torch.Tensor]]  # n -> un-augmented training images, normalised


def build_data(cfg: DataConfig, *, seed: int, device: torch.device | str = "cpu") -> Data:
    """Train and validation batches: in memory, or streamed from shards."""
    if cfg.shards:
        return _from_shards(cfg, seed=seed, device=device)
    if cfg.dataset != "fashion_mnist":  # config validation already restricts the names
        raise ValueError(f"data.dataset: unknown dataset {cfg.dataset!r}")
    train = Split(*fashion_mnist.load_split("train", cfg.root)).take(cfg.train_subset)
    val = Split(*fashion_mnist.load_split("test", cfg.root)).take(cfg.val_subset)
    common = dict(mean=fashion_mnist.MEAN, std=fashion_mnist.STD, device=device)

    def calibration(n: int) -> Iterator[torch.Tensor]:
        calib = MemoryBatches(train.take(n), batch_size=cfg.batch_size, train=False, **common)
        return (x for x, _ in calib.epoch(0))

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
        train_eval=MemoryBatches(train, batch_size=cfg.eval_batch_size, train=False, **common),
        in_channels=1,
        num_classes=len(fashion_mnist.CLASSES),
        classes=fashion_mnist.CLASSES,
        input_shape=tuple(train.images.shape[1:]),
        calibration=calibration,
    )


def _from_shards(cfg: DataConfig, *, seed: int, device: torch.device | str) -> Data:
    from dist_coop.data.shards import check_image_sizes, read_index
    from dist_coop.data.stream import ShardBatches

    index = read_index(cfg.shards)
    splits = index["splits"]
    val_split = cfg.val_split or ("val" if "val" in splits else "test")
    root = cfg.shards
    check_image_sizes(index, ("train", val_split), cfg.image_size, root)
    mean, std = index["mean"], index["std"]
    channels = len(mean)
    common = dict(
        mean=mean, std=std, channels=channels, image_size=cfg.image_size, device=device, on_corrupt=cfg.on_corrupt
    )
    train = ShardBatches(
        root,
        index,
        "train",
        batch_size=cfg.batch_size,
        train=True,
        seed=seed,
        padding=cfg.crop_padding,
        augment=cfg.augment,
        workers=cfg.workers,
        **common,
    )
    val = ShardBatches(root, index, val_split, batch_size=cfg.eval_batch_size, train=False, workers=0, **common)
    first, _ = next(iter(val.epoch(0)))

    def train_in_order(batch_size: int) -> ShardBatches:  # the training split unaugmented, in order
        return ShardBatches(root, index, "train", batch_size=batch_size, train=False, workers=0, **common)

    def calibration(n: int) -> Iterator[torch.Tensor]:
        calib = train_in_order(cfg.batch_size)
        seen = 0
        for x, _ in calib.epoch(0, check=False):
            if seen >= n:
                return
            seen += len(x)
            yield x

    return Data(
        train=train,
        val=val,
        train_eval=train_in_order(cfg.eval_batch_size),
        in_channels=channels,
        num_classes=len(index["classes"]),
        classes=tuple(index["classes"]),
        input_shape=tuple(first.shape[1:]),
        calibration=calibration,
    )
