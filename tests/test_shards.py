"""Shards written from datasets in their real on-disk formats, and streamed in step across ranks."""

import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_coop.config import load_config
from dist_coop.data import build_data, fashion_mnist
from dist_coop.data.shards import read_index, write_shards
from dist_coop.data.sources import bundled, cifar, image_folder, tiny_imagenet
from dist_coop.data.stream import ShardBatches
from tests.media import make_clip

RNG = np.random.default_rng(0)


def _jpeg(path: Path, size=64, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (
        RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if value is None
        else np.full((size, size, 3), value, np.uint8)
    )
    Image.fromarray(a).save(path, format="JPEG")


def make_tiny_imagenet(root: Path, per_class=6, val=9) -> list[str]:
    wnids = ["n01443537", "n01629819", "n01641577"]
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text(
        "n01443537\tgoldfish\nn01629819\tEuropean fire salamander\nn01641577\tbullfrog\nn99\tother\n"
    )
    for w in wnids:
        for i in range(per_class):
            _jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i in range(val):
        _jpeg(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % 3]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for i in range(2):
        _jpeg(root / "test" / "images" / f"test_{i}.JPEG")
    return wnids


def _stream(root, split, *, train, shard=0, num_shards=1, batch=4, workers=0, **kw):
    index = read_index(root)
    return ShardBatches(
        root,
        index,
        split,
        batch_size=batch,
        mean=index["mean"],
        std=index["std"],
        train=train,
        channels=len(index["mean"]),
        seed=3,
        padding=4,
        workers=workers,
        shard=shard,
        num_shards=num_shards,
        **kw,
    )


def test_tiny_imagenet_layout_to_shards(tmp_path):
    wnids = make_tiny_imagenet(tmp_path / "tin")
    src = tiny_imagenet(tmp_path / "tin")
    assert src.classes == wnids and src.class_names["n01641577"] == "bullfrog"
    assert [it.label for it in src.splits["val"][:4]] == [0, 1, 2, 0]
    index = write_shards(src, tmp_path / "shards", max_count=4, workers=2, progress=False)
    assert index["splits"]["train"]["count"] == 18 and len(index["splits"]["train"]["shards"]) == 5
    assert index["splits"]["test"]["count"] == 2
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        names = tar.getnames()
    assert {"train_00000000.jpg", "train_00000000.cls", "train_00000000.json"} <= set(names)
    assert not any(n.endswith((".pyd", ".pickle", ".pth")) for n in names)  # nothing to unpickle


@pytest.mark.parametrize("num_shards", [2, 3])
def test_stream_every_sample_once_and_same_within_exchange_group(tmp_path, num_shards):
    make_tiny_imagenet(tmp_path / "tin", per_class=8)  # 24 train samples
    write_shards(tiny_imagenet(tmp_path / "tin"), tmp_path / "s", max_count=2, workers=1, progress=False)  # 12 shards
    seen_val, lengths = Counter(), set()
    for k in range(num_shards):
        a = list(
            _stream(tmp_path / "s", "train", train=True, shard=k, num_shards=num_shards, batch=2, workers=2).epoch(0)
        )
        b = list(
            _stream(tmp_path / "s", "train", train=True, shard=k, num_shards=num_shards, batch=2, workers=2).epoch(0)
        )
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))  # an exchange group
        lengths.add(len(a))
        for _, y in _stream(tmp_path / "s", "val", train=False, shard=k, num_shards=num_shards).epoch(0):
            seen_val.update(y.tolist())
    assert lengths == {24 // num_shards // 2}  # every rank the same number of steps
    assert seen_val == Counter({0: 3, 1: 3, 2: 3})  # validation: every sample exactly once across ranks


@pytest.mark.parametrize("num_shards", [2, 3])
def test_train_epoch_sees_each_sample_once_across_shards(tmp_path, num_shards):
    root = tmp_path / "folder"
    for c in range(3):
        for i in range(8):
            _jpeg(
                root / "train" / f"class{c}" / f"{i}.jpg", size=16, value=c * 80 + i * 8
            )  # value identifies the sample
    write_shards(image_folder(root), tmp_path / "s", max_count=2, workers=1, progress=False)  # 12 shards
    pixels = []
    for k in range(num_shards):
        stream = _stream(
            tmp_path / "s", "train", train=True, shard=k, num_shards=num_shards, batch=2, workers=2, augment=False
        )
        for x, y in stream.epoch(1):
            pixels += [(round(float(v), 1), int(lab)) for v, lab in zip(x.mean(dim=(1, 2, 3)), y)]
    # each sample once per epoch over the ranks x 2 workers
    assert len(pixels) == 24 and len(set(pixels)) == 24


def test_stream_resumes_mid_epoch(tmp_path):
    make_tiny_imagenet(tmp_path / "tin", per_class=8)
    write_shards(tiny_imagenet(tmp_path / "tin"), tmp_path / "s", max_count=4, workers=1, progress=False)
    stream = _stream(tmp_path / "s", "train", train=True, batch=2, workers=2)
    full = list(stream.epoch(2))
    tail = list(stream.epoch(2, start=5))
    assert len(tail) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[5:], tail))


def _cifar10(root: Path):
    root.mkdir(parents=True)
    for name, n in [("data_batch_1", 6), ("data_batch_2", 6), ("test_batch", 4)]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % 10 for i in range(n)],
            b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    )


def test_cifar10_and_100_pickles(tmp_path):
    _cifar10(tmp_path / "c10")
    src = cifar(tmp_path / "c10")
    assert (
        len(src.classes) == 10 and len(src.splits["train"]) == 12 and src.splits["train"][0].array.shape == (32, 32, 3)
    )
    index = write_shards(src, tmp_path / "s10", max_count=5, workers=1, progress=False)
    x, y = next(_stream(tmp_path / "s10", "test", train=False).epoch(0))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3]
    assert len(index["mean"]) == 3
    root = tmp_path / "c100"
    root.mkdir()
    for split, n in (("train", 8), ("test", 4)):
        d = {
            b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [i * 7 % 100 for i in range(n)],
            b"coarse_labels": [i % 20 for i in range(n)],
            b"filenames": [b"f.png"] * n,
        }
        (root / split).write_bytes(pickle.dumps(d))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100, b"coarse_label_names": [b"y"] * 20}))
    fine, coarse = cifar(root, labels="fine"), cifar(root, labels="coarse")
    assert len(fine.classes) == 100 and [it.label for it in fine.splits["train"][:3]] == [0, 7, 14]
    assert len(coarse.classes) == 20 and [it.label for it in coarse.splits["test"]] == [0, 1, 2, 3]
    with pytest.raises(FileNotFoundError, match="neither CIFAR-10"):
        cifar(tmp_path)


def test_bad_input_names_the_file(tmp_path):
    make_tiny_imagenet(tmp_path / "tin")
    write_shards(tiny_imagenet(tmp_path / "tin"), tmp_path / "s", max_count=4, workers=1, progress=False)
    s = tmp_path / "s"
    with pytest.raises(ValueError, match=r"3 shard\(s\).*for 2 data shard\(s\) x 2 loader.*at least 4 shards"):
        _stream(s, "val", train=False, num_shards=2, workers=2)
    # a sample whose image does not decode: error naming shard and key, or skipped and counted
    bad = s / "val-000001.tar"
    with tarfile.open(bad) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(bad, "w") as tar:
        for m, data in members:
            if m.name.endswith(".jpg") and "00000005" in m.name:
                data = b"not a jpeg".ljust(len(data), b"\0")  # bit rot: the same size, so the index agrees
            import io

            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"val-000001.tar sample val_00000005: image does not decode"):
        list(_stream(s, "val", train=False).epoch(0))
    stream = _stream(s, "val", train=False, on_corrupt="skip")
    with pytest.warns(UserWarning, match="skipping corrupt sample"):
        n = sum(len(y) for _, y in stream.epoch(0))
    assert n == 8 and stream.skipped == 1
    with pytest.warns(UserWarning, match="skipping corrupt sample"):  # a second evaluation: the count is per epoch
        assert sum(len(y) for _, y in stream.epoch(1)) == 8 and stream.skipped == 2
    fresh = stream.sharded(0, 1)  # every setting kept, through the constructor: its counter starts afresh
    assert (fresh.on_corrupt, fresh.seed, fresh.padding, fresh.skipped, stream.skipped) == ("skip", 3, 4, 0, 2)
    with pytest.raises(ValueError, match=r"3 shard\(s\) .* for 4 data shard"):
        stream.sharded(0, 4)
    # a truncated shard
    data = (s / "train-000000.tar").read_bytes()
    (s / "train-000000.tar").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"train-000000.tar is \d+ bytes, the index says \d+: it was cut short"):
        list(_stream(s, "train", train=True, batch=2).epoch(0))
    (s / "train-000000.tar").write_bytes(data)
    # an index that disagrees with the shards: in total (read_index) or per shard (the stream)
    index = json.loads((s / "index.json").read_text())
    index["splits"]["val"]["count"] += 1
    (s / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="says 10 samples but its shards hold 9"):
        read_index(s)
    index["splits"]["val"]["count"] -= 1
    index["splits"]["val"]["shards"][0]["count"] += 1
    index["splits"]["val"]["shards"][1]["count"] -= 1
    (s / "index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError,
        match=r"val-000000.tar: shard is truncated .* after sample val_00000003 \(4 of the 5 samples the index",
    ):
        list(_stream(s, "val", train=False).epoch(0))
    shard1 = (s / "val-000001.tar").read_bytes()
    (s / "val-000001.tar").write_bytes((s / "val-000002.tar").read_bytes())  # shard 1 now holds 1, not 4
    with pytest.raises(ValueError, match=r"val-000001.tar is \d+ bytes, the index says"):
        read_index(s)
    (s / "val-000001.tar").write_bytes(shard1)
    (s / "val-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard val-000002.tar listed in the index is missing"):
        read_index(s)


def test_label_out_of_range(tmp_path):
    make_tiny_imagenet(tmp_path / "tin")
    write_shards(tiny_imagenet(tmp_path / "tin"), tmp_path / "s", max_count=4, workers=1, progress=False)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    index["classes"] = index["classes"][:2]
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="label 2 out of range \\[0, 2\\)"):
        list(_stream(tmp_path / "s", "val", train=False).epoch(0))


def test_quickstart_from_bundled_shards(tmp_path, fmnist_root):
    write_shards(bundled(), tmp_path / "fm", max_count=256, limit=1024, progress=False)
    cfg = load_config(
        "configs/quickstart.yaml", [f"--data.shards={tmp_path / 'fm'}", "--data.train_subset=0", "--data.batch_size=64"]
    )
    data = build_data(cfg.data, seed=0)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10 and len(data.train) == 16
    x, y = next(data.train.epoch(0))
    assert x.shape == (64, 1, 28, 28) and abs(float(x.mean())) < 0.5
    assert sum(len(y) for _, y in data.val.epoch(0)) == 10_000  # the limit cuts the training split only
    # the training split as evaluation sees it (`dist-coop eval --split train`): every sample, unaugmented, in order
    first, again = next(data.train_eval.epoch(0)), next(data.train_eval.epoch(0))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(torch.cat([y for _, y in data.train_eval.epoch(0)]), fashion_mnist.load_split("train")[1][:1024])


def test_video_clips_become_frame_shards(tmp_path):
    from dist_coop.cli import main

    make_clip(tmp_path / "clips" / "bars" / "a.mp4", "smptebars")
    make_clip(tmp_path / "clips" / "bars" / "b.mp4", "smptebars", seconds=1)
    make_clip(tmp_path / "clips" / "noise" / "c.mkv", "testsrc2")
    assert (
        main(
            [
                "shards",
                "--video",
                "--root",
                str(tmp_path / "clips"),
                "--out",
                str(tmp_path / "s"),
                "--fps",
                "2",
                "--size",
                "32",
                "--max-count",
                "3",
            ]
        )
        == 0
    )
    index = read_index(tmp_path / "s")
    assert index["classes"] == ["bars", "noise"] and index["splits"]["train"]["count"] == 4 + 2 + 4  # 2 frames/s
    x, y = next(_stream(tmp_path / "s", "train", train=False, batch=10).epoch(0))
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [0] * 6 + [1] * 4
    bars, noise = x[:6].float(), x[6:].float()
    assert bars.std() > 0.3 and not torch.allclose(bars.mean(0), noise.mean(0), atol=0.1)  # real, different frames
    (tmp_path / "clips" / "noise" / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="ffmpeg cannot decode .*broken.mp4"):
        from dist_coop.data.video import video_folder

        video_folder(tmp_path / "clips")


def test_one_ffmpeg_decoder_for_shards_and_streams(tmp_path):
    """``ffmpeg_frames`` (also what ``dist-coop stream`` reads): gray or RGB at any size and rate, a consumer may
    stop early, and ``decode_frames`` (the shard writer's) is its frames stacked."""
    from dist_coop.data.video import decode_frames, ffmpeg_frames

    clip = make_clip(tmp_path / "c.mp4", "testsrc2", rate=10, seconds=2)
    gray = list(ffmpeg_frames(clip, height=6, width=8, channels=1))
    assert len(gray) == 20 and gray[0].shape == (6, 8, 1) and gray[0].dtype == np.uint8
    rgb = list(ffmpeg_frames(clip, height=16, width=16, fps=2))
    assert len(rgb) == 4 and rgb[0].shape == (16, 16, 3)
    np.testing.assert_array_equal(decode_frames(clip, fps=2, size=16), np.stack(rgb))
    every = list(ffmpeg_frames(clip, height=16, width=16))
    frames = ffmpeg_frames(clip, height=16, width=16)
    first = next(frames)
    frames.close()  # ffmpeg's broken pipe is not an error
    assert len(every) == 20 and not np.array_equal(every[0], every[-1])
    np.testing.assert_array_equal(first, every[0])
    with pytest.raises(FileNotFoundError, match="video not found"):
        next(ffmpeg_frames(tmp_path / "none.mp4", height=4, width=4))
    (tmp_path / "text.mp4").write_text("not a video\n")
    with pytest.raises(ValueError, match=r"ffmpeg cannot decode .*text.mp4: .*Invalid data"):
        list(ffmpeg_frames(tmp_path / "text.mp4", height=4, width=4))
