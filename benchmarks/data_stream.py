"""Is data the bottleneck? Shard writing and streaming speed for 64x64 JPEG shards, per core,
next to the samples/s a cooperative training step consumes.

    python benchmarks/data_stream.py [--images 2000] [--model resnet34_64 --width 16]

Makes a folder tree of random 64x64 JPEGs, writes shards (1 encoding process, then one per core),
streams them (decode + normalise + crop/flip augmentation, 1 process), then times cooperative
steps (Leader + 2 Teammates, depths 0.25-1.0) on 3x64x64 batches on this machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dist_coop.config import load_config
from dist_coop.data.shards import read_index, write_shards
from dist_coop.data.sources import image_folder
from dist_coop.data.stream import ShardBatches
from dist_coop.trainer import Trainer


def make_images(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)  # JPEG-friendly blocks
        Image.fromarray(base).save(d / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="resnet34_64")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "imgs", args.images)
        src = image_folder(tmp / "imgs")
        rates = {}
        for workers in (1, cores):
            t = time.perf_counter()
            write_shards(src, tmp / f"shards{workers}", max_count=250, workers=workers, progress=False)
            rates[workers] = args.images / (time.perf_counter() - t)
        index = read_index(tmp / f"shards{cores}")
        stream = ShardBatches(
            tmp / f"shards{cores}",
            index,
            "train",
            batch_size=args.batch,
            mean=index["mean"],
            std=index["std"],
            train=True,
            channels=3,
            padding=4,
            workers=0,
        )
        t = time.perf_counter()
        n = sum(len(y) for _, y in stream.epoch(0))
        stream_rate = n / (time.perf_counter() - t)
    cfg = load_config(
        None,
        [
            f"--model.name={args.model}",
            f"--model.width={args.width}",
            "--model.num_classes=10",
            "--tracking.backend=none",
            f"--data.batch_size={args.batch}",
            "--train.device=cpu",
        ],
    )
    torch.set_num_threads(cores)
    trainer = Trainer(cfg, _FakeData(args.batch), run_dir=tmp)  # type: ignore[arg-type]
    x, y = torch.randn(args.batch, 3, 64, 64), torch.randint(0, 10, (args.batch,))
    trainer.train_step(x, y)
    t = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(x, y)
    step_rate = args.batch * args.steps / (time.perf_counter() - t)
    print(f"{args.images} random 64x64 JPEGs, shards of 250, batch {args.batch}, {cores} cores")
    print(f"shard writing, 1 process        {rates[1]:>9.0f} samples/s")
    print(f"shard writing, {cores} processes      {rates[cores]:>9.0f} samples/s")
    print(f"stream (decode+augment), 1 core {stream_rate:>9.0f} samples/s")
    print(f"cooperative step ({args.model} w{args.width}, {cores} threads) {step_rate:>6.0f} samples/s")
    print(f"stream cores needed to feed the step: {step_rate / stream_rate:.2f}")


class _FakeData:
    """Only what the Trainer reads at construction: the training batches' shape of the world."""

    def __init__(self, batch: int) -> None:
        from dist_coop.data.memory import MemoryBatches, Split

        split = Split(torch.zeros(batch * 4, 3, 64, 64, dtype=torch.uint8), torch.zeros(batch * 4, dtype=torch.long))
        self.train = MemoryBatches(split, batch_size=batch, mean=(0.5,), std=(0.5,), train=True)
        self.val = self.train


if __name__ == "__main__":
    main()
