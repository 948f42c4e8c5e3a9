"""Batches streamed from webdataset shards, in step across ranks.

Shards are split by *data shard* (the exchange group, DESIGN.md section 2) and then by loader
worker. The shard order of an epoch is a permutation seeded by (seed, epoch), the in-memory
shuffle buffer by (seed, epoch, data shard, worker) and the augmentation by (seed, epoch, step,
data shard): the three nets of an exchange group read the same samples in the same order with
the same pixels. The trainer owns the step count: every data shard yields exactly ``len(self)``
batches per epoch (a shard list that runs out starts over), so no rank runs out early and hangs
a collective. Evaluation reads each validation shard on exactly one rank, in order, once.

Samples are decoded only as images, class indices and JSON; nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dist_coop.data.augment import augment_step, epoch_order, normalize

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


class CorruptSample(ValueError):
    pass


def decode_sample(sample: dict[str, Any], *, channels: int, size: int, num_classes: int) -> tuple[np.ndarray, int]:
    """(uint8 (C, H, W), label) of one webdataset sample; a clear error naming shard and key."""
    from PIL import Image

    where = f"{sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSample(
            f"{where}: no image ({', '.join(IMAGE_KEYS)}) in fields {sorted(k for k in sample if not k.startswith('__'))}"
        )
    try:
        img = Image.open(io.BytesIO(sample[key]))
        img = img.convert("L" if channels == 1 else "RGB")
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    except Exception as e:
        raise CorruptSample(f"{where}: image does not decode ({e})") from e
    try:
        label = int(
            sample["cls"].decode() if isinstance(sample.get("cls"), bytes) else json.loads(sample["json"])["label"]
        )
    except Exception as e:
        raise CorruptSample(f"{where}: no readable class index ({e})") from e
    if not 0 <= label < num_classes:
        raise ValueError(f"{where}: label {label} out of range [0, {num_classes})")
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return array, label


class _Pipeline(torch.utils.data.IterableDataset):
    """One data shard's samples, batched, in a DataLoader worker (or in-process)."""

    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        shuffle_seed: int | None,
        buffer: int,
        decode_kw: dict,
        on_corrupt: str,
        train: bool,
    ):
        self.urls, self.batch_size, self.shuffle_seed, self.buffer = urls, batch_size, shuffle_seed, buffer
        self.decode_kw, self.on_corrupt, self.train = decode_kw, on_corrupt, train

    def _samples(self, urls: list[str], wid: int):
        """One pass over ``urls`` (evaluation), or passes without end (training: the consumer stops),
        each pass shuffled on its own so a sample never repeats before every other one came."""
        import webdataset as wds

        handler = wds.reraise_exception if self.on_corrupt == "error" else wds.warn_and_continue
        rounds = range(10**9) if self.train else range(1)
        for r in rounds:
            samples = wds.tarfile_to_samples(handler=handler)(iter({"url": u} for u in urls))
            rng = random.Random((self.shuffle_seed * 1009 + wid) * 101 + r) if self.shuffle_seed is not None else None
            yield from _shuffled(samples, rng, self.buffer)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        xs, ys, skipped = [], [], 0
        for sample in self._samples(self.urls[wid::nw], wid):
            try:
                x, y = decode_sample(sample, **self.decode_kw)
            except CorruptSample as e:
                if self.on_corrupt == "error":
                    raise
                warnings.warn(f"skipping corrupt sample: {e}", stacklevel=1)
                skipped += 1
                continue
            xs.append(x)
            ys.append(y)
            if len(xs) == self.batch_size:
                yield torch.from_numpy(np.stack(xs)), torch.tensor(ys), skipped
                xs, ys, skipped = [], [], 0
        if xs and not self.train:
            yield torch.from_numpy(np.stack(xs)), torch.tensor(ys), skipped


def _shuffled(samples, rng: random.Random | None, buffer: int):
    if rng is None:
        yield from samples
        return
    pool: list = []
    for s in samples:
        if len(pool) < buffer:
            pool.append(s)
            continue
        i = rng.randrange(len(pool))
        pool[i], s = s, pool[i]
        yield s
    rng.shuffle(pool)
    yield from pool


class ShardBatches:
    """The stream with the interface of ``MemoryBatches``: ``sharded``, ``epoch``, ``len``."""

    def __init__(
        self,
        root: str | Path,
        index: dict[str, Any],
        split: str,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        channels: int,
        image_size: int = 0,
        seed: int = 0,
        padding: int = 0,
        augment: bool = True,
        device: torch.device | str = "cpu",
        workers: int = 0,
        shuffle_buffer: int = 2000,
        on_corrupt: str = "error",
        shard: int = 0,
        num_shards: int = 1,
    ) -> None:
        if split not in index["splits"]:
            raise ValueError(f"shards in {root} have no split {split!r} (have {list(index['splits'])})")
        self.root, self.index, self.split = Path(root), index, split
        self.shards = index["splits"][split]["shards"]
        self.batch_size, self.mean, self.std, self.train = batch_size, tuple(mean), tuple(std), train
        self.channels, self.image_size, self.seed = channels, image_size, seed
        self.padding, self.augment, self.device = padding, augment, torch.device(device)
        self.workers, self.shuffle_buffer, self.on_corrupt = workers, shuffle_buffer, on_corrupt
        self.shard, self.num_shards = shard, num_shards
        self.skipped = 0  # corrupt samples skipped so far (on_corrupt: skip)
        needed = num_shards * max(1, workers)
        if len(self.shards) < needed:
            raise ValueError(
                f"{split}: {len(self.shards)} shard(s) in {root} for {num_shards} data shard(s) x {max(1, workers)} loader "
                f"worker(s); write at least {needed} shards (dist-coop shards --max-count smaller)"
            )
        total = index["splits"][split]["count"]
        if train and total // num_shards < batch_size:
            raise ValueError(
                f"{split}: {total} samples cannot fill a batch of {batch_size} on {num_shards} data shards"
            )

    def sharded(self, shard: int, num_shards: int) -> ShardBatches:
        return ShardBatches(
            self.root,
            self.index,
            self.split,
            batch_size=self.batch_size,
            mean=self.mean,
            std=self.std,
            train=self.train,
            channels=self.channels,
            image_size=self.image_size,
            seed=self.seed,
            padding=self.padding,
            augment=self.augment,
            device=self.device,
            workers=self.workers,
            shuffle_buffer=self.shuffle_buffer,
            on_corrupt=self.on_corrupt,
            shard=shard,
            num_shards=num_shards,
        )

    def _my_shards(self, epoch: int) -> list[dict]:
        order = list(range(len(self.shards)))
        if self.train:
            order = epoch_order(len(order), self.seed, epoch).tolist()
        return [self.shards[i] for i in order][self.shard :: self.num_shards]

    def __len__(self) -> int:
        """Training: the same on every data shard (total // shards // batch); evaluation: this shard's batches."""
        if self.train:
            return self.index["splits"][self.split]["count"] // self.num_shards // self.batch_size
        count = sum(s["count"] for s in self._my_shards(0))
        return -(-count // self.batch_size)

    def epoch(self, epoch: int, start: int = 0, *, check: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        mine = self._my_shards(epoch)
        urls = [str(self.root / s["name"]) for s in mine]
        steps = len(self)  # training streams without end; the trainer owns the step count
        decode_kw = {"channels": self.channels, "size": self.image_size, "num_classes": len(self.index["classes"])}
        pipe = _Pipeline(
            urls,
            batch_size=self.batch_size,
            shuffle_seed=(self.seed * 1_000_003 + epoch) * 1009 + self.shard if self.train else None,
            buffer=self.shuffle_buffer,
            decode_kw=decode_kw,
            on_corrupt=self.on_corrupt,
            train=self.train,
        )
        loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=self.workers)
        seen = 0
        for step, (x, y, skipped) in enumerate(loader):
            if step >= steps:
                break
            self.skipped += int(skipped)
            seen += len(y)
            if step < start:  # resuming mid-epoch: replay the stream to the saved position
                continue
            x = normalize(x.to(self.device, non_blocking=True), self.mean, self.std)
            y = y.to(self.device, non_blocking=True)
            if self.train and self.augment:
                x = augment_step(x, self.padding, seed=self.seed, epoch=epoch, step=step, shard=self.shard)
            yield x, y
        if check and not self.train and start == 0 and seen + self.skipped != sum(s["count"] for s in mine):
            raise ValueError(
                f"{self.split}: the index says data shard {self.shard} holds {sum(s['count'] for s in mine)} samples, "
                f"the shards held {seen + self.skipped}: the index disagrees with the shards"
            )
