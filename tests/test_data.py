import gzip
import struct

import numpy as np
import pytest
import torch

from dist_coop.config import DataConfig
from dist_coop.data import build_data, fashion_mnist
from dist_coop.data.augment import random_crop_flip
from dist_coop.data.memory import MemoryBatches, Split


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_root(tmp_path, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fashion_mnist.FILES[split]
        _write_idx(tmp_path / images, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / labels, np.arange(n) % 10)
    return tmp_path


def test_idx_files_in_the_standard_format_are_read(tmp_path):
    root = _fake_root(tmp_path)
    x, y = fashion_mnist.load_split("train", root)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.uint8
    assert y.tolist() == [i % 10 for i in range(12)]


def test_truncated_and_bad_files_name_the_file(tmp_path):
    root = _fake_root(tmp_path)
    images = root / fashion_mnist.FILES["train"][0]
    data = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is truncated"):
        fashion_mnist.load_split("train", root)
    labels = root / fashion_mnist.FILES["test"][1]
    _write_idx(labels, np.array([0, 1, 2, 3, 10]))
    with pytest.raises(ValueError, match="label 10 out of range"):
        fashion_mnist.load_split("test", root)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.load_split("train", tmp_path)


def test_real_fashion_mnist(fmnist_root):
    data = build_data(DataConfig(train_subset=1000, batch_size=100), seed=0)
    assert len(data.val.split) == 10_000 and len(data.train.split) == 1000
    assert len(data.train) == 10 and len(data.val) == 10
    counts = torch.bincount(data.val.split.labels, minlength=10)
    assert counts.tolist() == [1000] * 10  # the real test set is balanced
    x, y = next(data.train.epoch(0))
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert abs(data.val.split.images.float().mean().item() / 255 - 0.286) < 0.01


def test_batches_are_deterministic_and_resumable():
    split = Split(
        torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 4, 4).contiguous(), torch.arange(40)
    )
    batches = MemoryBatches(split, batch_size=8, mean=(0.0,), std=(1.0,), train=True, seed=3, padding=1)
    epoch0 = list(batches.epoch(0))
    again = list(batches.epoch(0, start=2))
    for (xa, ya), (xb, yb) in zip(epoch0[2:], again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    seen = torch.cat([y for _, y in epoch0])
    assert sorted(seen.tolist()) == list(range(40))  # every sample once per epoch
    assert not torch.equal(seen, torch.cat([y for _, y in batches.epoch(1)]))  # reshuffled


def test_random_crop_flip():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = random_crop_flip(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    flipped = x.flip(-1)
    # every output is a shifted (and maybe flipped) copy: its 2x2 centre comes from the source
    n_flip = sum(torch.equal(o[..., 1:3, 1:3], flipped[0, ..., 1:3, 1:3]) for o in out)
    n_same = sum(torch.equal(o, x[0]) for o in out)
    assert 0 < n_same < 64 and 0 < n_flip < 64
    again = random_crop_flip(x, 1, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_random_crop_is_the_per_sample_slice_of_the_padded_image():
    """The batched crop (one gather) against slicing each sample's padded image at its drawn offsets; the
    batch comes out with canonical strides, for 1 and 3 channels and non-square images."""
    for c, h, w, pad in ((1, 5, 7, 2), (3, 8, 8, 4)):
        x = torch.randn(6, c, h, w)
        g = torch.Generator().manual_seed(1)
        out = random_crop_flip(x, pad, g, flip=False)
        g = torch.Generator().manual_seed(1)  # the same draws as the crop's
        dy, dx = (torch.randint(0, 2 * pad + 1, (6,), generator=g) for _ in range(2))
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        want = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(6)])
        assert torch.equal(out, want) and out.is_contiguous()
        assert out.stride() == (c * h * w, h * w, w, 1)


def test_shards_cover_training_and_validation_exactly_once():
    split = Split(torch.zeros(103, 1, 2, 2, dtype=torch.uint8), torch.arange(103))
    kw = dict(batch_size=10, mean=(0.0,), std=(1.0,), seed=1)
    train = MemoryBatches(split, train=True, augment=False, **kw)
    shards = [train.sharded(k, 3) for k in range(3)]
    assert {len(s) for s in shards} == {3}  # 103 // (10 * 3) steps, the same on every shard
    seen = [int(v) for s in shards for _, y in s.epoch(0) for v in y]
    assert len(seen) == len(set(seen)) == 90
    val = MemoryBatches(split, train=False, **kw)
    seen = sorted(int(v) for k in range(3) for _, y in val.sharded(k, 3).epoch(0) for v in y)
    assert seen == list(range(103))
    with pytest.raises(ValueError, match="shard 3 is not in"):
        val.sharded(3, 3)
    again = train.sharded(2, 3)  # every other setting kept, checked again by the constructor
    assert (again.seed, again.augment, again.mean, again.shard, train.shard) == (1, False, (0.0,), 2, 0)
    with pytest.raises(ValueError, match="larger than the training split"):
        train.sharded(0, 11)
