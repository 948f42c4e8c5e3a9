"""Batches streamed from webdataset shards, in step across ranks.

Shards are split by *data shard* (the exchange group: docs/design.md, *The data stream*) and then
by loader worker. The shard order of an epoch is a permutation seeded by (seed, epoch), the in-memory
shuffle buffer by (seed, epoch, data shard, worker) and the augmentation by (seed, epoch, step,
data shard): the three nets of an exchange group read the same samples in the same order with
the same pixels. The trainer owns the step count: every data shard yields exactly ``len(self)``
batches per epoch (a shard list that runs out starts over), so no rank runs out early and hangs
a collective. Evaluation reads each validation shard on exactly one rank, in order, once.

Shards are local tar files opened here (never a URL: a shard name is a plain file name, checked
against ``safety.check_shard_name``) and read one member at a time. Samples are decoded only as
images (JPEG and PNG, the formats the writer stores), class indices and JSON; nothing is unpickled.
A tar member larger than the index's largest, or an image with more pixels than its largest, is
refused before it is read or decoded. A shard that is cut short or a sample that does not decode or
breaks a limit is one error line naming the shard and the sample, also from a DataLoader worker
(``data.on_corrupt: skip`` warns, drops and counts instead).
"""

from __future__ import annotations

import json
import random
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dist_coop.data.augment import augment_step, epoch_order, normalize
from dist_coop.data.batches import Sharded
from dist_coop.data.images import reason as image_error
from dist_coop.data.safety import (
    MAX_MEMBER_BYTES,
    MAX_PIXELS,
    SHARD_FORMATS,
    TooLarge,
    check_shard_name,
    open_image,
    split_limits,
)

IMAGE_KEYS = tuple(SHARD_FORMATS)  # the image fields of a sample: those the writer stores
_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # a member name: sample key, then the field after the first dot


class ShardError(ValueError):
    """A shard, or a sample in it, that cannot be used: one line naming the shard (and the sample)."""


class CorruptSample(ShardError):
    pass


class CorruptShard(ShardError):
    """A shard that is cut short or not a readable tar; ``lost``: the samples the index promised but it lacks."""

    def __init__(self, message: str, lost: int = 0) -> None:
        super().__init__(message)
        self.lost = lost


def _reason(e: Exception) -> str:
    """One line for an exception from reading a tar."""
    text = str(e.args[0]) if e.args and not isinstance(e, OSError) else str(e)
    return f"{type(e).__name__}: {' '.join(text.split())}".rstrip(": ")


class _MemberTooLarge(Exception):
    def __init__(self, key: str, field: str, size: int) -> None:
        super().__init__(key, field, size)
        self.key, self.field, self.size = key, field, size


def _tar_samples(path: str, max_member: int) -> Iterator[dict[str, Any]]:
    """The samples of the local tar file ``path``: consecutive members with one key grouped into
    ``{"__key__", "__url__", <field>: bytes}`` (webdataset's convention). A member larger than
    ``max_member`` raises _MemberTooLarge before it is read."""
    sample: dict[str, Any] | None = None
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            tar.members = []  # read as a stream: no list of every member kept
            m = _KEY.match(member.name)
            if not member.isreg() or m is None:
                continue
            key, field = m[1], m[2].lower()
            if member.size > max_member:
                raise _MemberTooLarge(key, field, member.size)
            if sample is None or sample["__key__"] != key or field in sample:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": path}
            sample[field] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


def shard_samples(
    path: str, count: int = 0, max_member: int = MAX_MEMBER_BYTES, member_limit: str = ""
) -> Iterator[dict[str, Any]]:
    """The samples of one shard, a local file; a shard that is not a readable tar, holds another number of
    samples than ``count`` (the index's; 0 = unknown) or a member over ``max_member`` bytes (``member_limit``
    says whose limit) raises CorruptShard naming it and the last good sample.

    A tar cut at a member boundary reads as a shorter tar and yields the cut sample with fields
    missing, so each sample is held back until the next one shows the shard went on past it; a shard
    that ends short keeps its last sample only when it has every field the writer writes.
    """
    n, last, pending = 0, None, None

    def cut(reason: str = "") -> CorruptShard:
        after = f"after sample {last}" if last else "before its first sample"
        listed = f"{n} of the {count} samples the index lists" if count else f"{n} samples read"
        return CorruptShard(
            f"{path}: shard is truncated or corrupt {after} ({listed}{'; ' + reason if reason else ''}); "
            "copy or write the shards again",
            lost=max(count - n, 1),
        )

    error = None
    try:
        for sample in _tar_samples(path, max_member):
            if pending is not None:
                n, last = n + 1, pending["__key__"]
                yield pending
            if count and n >= count:
                raise CorruptShard(
                    f"{path}: shard holds more than the {count} samples the index lists (sample "
                    f"{sample.get('__key__')}): the index was not written with these shards; write the shards again"
                )
            pending = sample
    except CorruptShard:
        raise
    except _MemberTooLarge as e:
        limit = member_limit or f"the {max_member:,} bytes a shard member may have"
        raise CorruptShard(
            f"{path} sample {e.key}: its {e.field} field is {e.size:,} bytes, more than {limit}; the shard was "
            "changed after writing or not written by dist-coop shards: write the shards again",
            lost=max(count - n, 1),
        ) from None
    except Exception as e:  # tarfile.ReadError, OSError and friends
        error = e
    whole = pending is not None and {"cls", "json"} <= pending.keys() and any(k in pending for k in IMAGE_KEYS)
    if pending is not None and (whole or (error is None and n + 1 >= count)):
        n, last = n + 1, pending["__key__"]
        yield pending
    if error is not None:
        raise cut(_reason(error)) from error
    if n < count:
        raise cut()


def decode_sample(
    sample: dict[str, Any],
    *,
    channels: int,
    size: int,
    num_classes: int,
    max_pixels: int = MAX_PIXELS,
    pixel_limit: str = "",
) -> tuple[np.ndarray, int]:
    """(uint8 (C, H, W), label) of one sample; a clear error naming shard and key. The image is opened only
    in the format its field names, and refused before decoding when it has more than ``max_pixels``."""
    from PIL import Image

    where = f"{sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSample(
            f"{where}: no image ({', '.join(IMAGE_KEYS)}) in fields {sorted(k for k in sample if not k.startswith('__'))}"
        )
    try:
        limit = pixel_limit or f"the {max_pixels:,} pixels a shard image may have"
        img = open_image(sample[key], (SHARD_FORMATS[key],), max_pixels, limit)
    except TooLarge as e:
        raise CorruptSample(
            f"{where}: {e}; the shard was changed after writing or not written by dist-coop shards: write the "
            "shards again"
        ) from None
    except Exception as e:
        raise CorruptSample(f"{where}: image does not decode ({image_error(e)})") from e
    try:
        img = img.convert("L" if channels == 1 else "RGB")
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    except Exception as e:
        raise CorruptSample(f"{where}: image does not decode ({image_error(e)})") from e
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
        urls: list[tuple[str, int]],  # (shard file, its sample count in the index)
        *,
        max_member: tuple[int, str],  # the largest tar member read, and whose limit that is
        batch_size: int,
        shuffle_seed: int | None,
        buffer: int,
        decode_kw: dict,
        on_corrupt: str,
        train: bool,
    ):
        self.urls, self.batch_size, self.shuffle_seed, self.buffer = urls, batch_size, shuffle_seed, buffer
        self.decode_kw, self.on_corrupt, self.train, self.max_member = decode_kw, on_corrupt, train, max_member

    def _shards(self, urls: list[tuple[str, int]]) -> Iterator[dict[str, Any]]:
        """The samples of ``urls`` in order; on_corrupt skip: a broken shard's missing samples become a
        ``{"__lost__": n}`` marker."""
        for url, count in urls:
            try:
                yield from shard_samples(url, count, *self.max_member)
            except CorruptShard as e:
                if self.on_corrupt == "error":
                    raise
                warnings.warn(f"skipping the rest of a corrupt shard: {e}", stacklevel=1)
                yield {"__lost__": e.lost}

    def _samples(self, urls: list[tuple[str, int]], wid: int):
        """One pass over ``urls`` (evaluation), or passes without end (training: the consumer stops),
        each pass shuffled on its own so a sample never repeats before every other one came."""
        rounds = range(10**9) if self.train else range(1)
        for r in rounds:
            rng = random.Random((self.shuffle_seed * 1009 + wid) * 101 + r) if self.shuffle_seed is not None else None
            yield from _shuffled(self._shards(urls), rng, self.buffer)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int, str]]:
        """(images, labels, samples skipped, "") batches; a shard or sample that cannot be used ends the
        stream with one (empty, empty, skipped, message) item, so a DataLoader worker reports one line
        instead of a worker traceback (``ShardBatches.epoch`` raises it)."""
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        xs, ys, skipped = [], [], 0
        try:
            for sample in self._samples(self.urls[wid::nw], wid):
                if "__lost__" in sample:
                    skipped += sample["__lost__"]
                    continue
                try:
                    x, y = decode_sample(sample, **self.decode_kw)
                except CorruptSample as e:
                    if self.on_corrupt == "error":
                        raise
                    warnings.warn(f"skipping corrupt sample: {e}", stacklevel=1)
                    skipped += 1
                    continue
                if xs and x.shape != xs[0].shape:
                    raise ShardError(
                        f"{sample.get('__url__')} sample {sample.get('__key__')}: image is {x.shape[2]}x{x.shape[1]} "
                        f"but the batch holds {xs[0].shape[2]}x{xs[0].shape[1]} (width x height); set data.image_size "
                        "to resize every image to one square size"
                    )
                xs.append(x)
                ys.append(y)
                if len(xs) == self.batch_size:
                    yield torch.from_numpy(np.stack(xs)), torch.tensor(ys), skipped, ""
                    xs, ys, skipped = [], [], 0
            if xs and not self.train:
                yield torch.from_numpy(np.stack(xs)), torch.tensor(ys), skipped, ""
        except (ValueError, OSError) as e:  # ShardError, a label out of range, a shard that cannot be opened
            yield torch.empty(0), torch.empty(0, dtype=torch.long), skipped, " ".join(str(e).split())


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


@dataclass(eq=False, repr=False)
class ShardBatches(Sharded):
    """The stream with the interface of ``MemoryBatches``: ``sharded``, ``epoch``, ``len``.

    Data shard k of n (``sharded(k, n)``) reads every n-th shard file of the epoch's shard order, from
    the k-th on; training yields the same number of batches on every data shard.
    """

    root: str | Path
    index: dict[str, Any]
    split: str
    _: KW_ONLY
    batch_size: int
    mean: Sequence[float]
    std: Sequence[float]
    train: bool
    channels: int
    image_size: int = 0
    seed: int = 0
    padding: int = 0
    augment: bool = True
    device: torch.device | str = "cpu"
    workers: int = 0
    shuffle_buffer: int = 2000
    on_corrupt: str = "error"
    shard: int = 0
    num_shards: int = 1
    skipped: int = field(default=0, init=False)  # corrupt samples skipped so far (on_corrupt: skip)

    def __post_init__(self) -> None:
        root, index, split, num_shards = self.root, self.index, self.split, self.num_shards
        if split not in index["splits"]:
            raise ValueError(f"shards in {root} have no split {split!r} (have {list(index['splits'])})")
        self.root, self.shards = Path(root), index["splits"][split]["shards"]
        for s in self.shards:  # also for an index that did not come through read_index
            check_shard_name(s["name"], self.root / "index.json")
        self.pixel_limit, self.member_limit = split_limits(index["splits"][split])
        self.mean, self.std, self.device = tuple(self.mean), tuple(self.std), torch.device(self.device)
        needed = num_shards * max(1, self.workers)
        if len(self.shards) < needed:
            raise ValueError(
                f"{split}: {len(self.shards)} shard(s) in {root} for {num_shards} data shard(s) x "
                f"{max(1, self.workers)} loader worker(s); write at least {needed} shards (dist-coop shards "
                "--max-count smaller)"
            )
        total = index["splits"][split]["count"]
        if self.train and total // num_shards < self.batch_size:
            raise ValueError(
                f"{split}: {total} samples cannot fill a batch of {self.batch_size} on {num_shards} data shards"
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
        urls = [(str(self.root / s["name"]), s["count"]) for s in mine]
        steps = len(self)  # training streams without end; the trainer owns the step count
        decode_kw = {
            "channels": self.channels,
            "size": self.image_size,
            "num_classes": len(self.index["classes"]),
            "max_pixels": self.pixel_limit[0],
            "pixel_limit": self.pixel_limit[1],
        }
        pipe = _Pipeline(
            urls,
            batch_size=self.batch_size,
            shuffle_seed=(self.seed * 1_000_003 + epoch) * 1009 + self.shard if self.train else None,
            buffer=self.shuffle_buffer,
            decode_kw=decode_kw,
            on_corrupt=self.on_corrupt,
            train=self.train,
            max_member=self.member_limit,
        )
        loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=self.workers)
        seen = skipped_now = 0
        for step, (x, y, skipped, error) in enumerate(loader):
            if error:
                raise ShardError(error) from None
            if step >= steps:
                break
            self.skipped += int(skipped)
            skipped_now += int(skipped)
            seen += len(y)
            if step < start:  # resuming mid-epoch: replay the stream to the saved position
                continue
            x = normalize(x.to(self.device, non_blocking=True), self.mean, self.std)
            y = y.to(self.device, non_blocking=True)
            if self.train and self.augment:
                x = augment_step(x, self.padding, seed=self.seed, epoch=epoch, step=step, shard=self.shard)
            yield x, y
        if check and not self.train and start == 0 and seen + skipped_now != sum(s["count"] for s in mine):
            raise ValueError(
                f"{self.split}: the index says data shard {self.shard} holds {sum(s['count'] for s in mine)} samples, "
                f"the shards held {seen + skipped_now}: the index disagrees with the shards"
            )
