"""Files from strangers and a writer that dies: every input is a real file with a real payload.

Shard indexes whose shard names are shell commands or paths out of the folder; shards whose image
fields are other formats (GIF, BMP, EPS reaching a Ghostscript binary), decompression bombs or
oversized members; dataset folders copied from a Mac (``._name.JPEG``, ``.DS_Store``, ``__MACOSX``);
CIFAR pickles that call ``os.system``; a shard writer killed mid-write or between its renames, and
one writing to a real full disk (a tmpfs).
"""

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from dist_coop.cli import main
from dist_coop.config import DataConfig
from dist_coop.data import build_data, safety
from dist_coop.data.shards import read_index, write_shards
from dist_coop.data.sources import cifar, image_folder, tiny_imagenet
from dist_coop.data.stream import ShardBatches, shard_samples
from dist_coop.data.swap import swap_into_place
from tests.helpers import small_tmpfs
from tests.test_shards import _stream, make_tiny_imagenet

RNG = np.random.default_rng(7)
ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = "pipe:touch pwned; cat train-000000.tar"


def _png_folder(root: Path, n: int = 8, size: int = 16) -> Path:
    for i in range(n):
        path = root / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format="PNG")
    return root


def _rewrite(shard: Path, member: str, data: bytes) -> None:
    """Replace one member of a real shard (keeping the order) and the shard's file size in its index.json."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert member in [m.name for m, _ in members]
    with tarfile.open(shard, "w") as tar:
        for m, old in members:
            new = data if m.name == member else old
            m.size = len(new)
            tar.addfile(m, io.BytesIO(new))
    index_path = shard.parent / "index.json"
    index = json.loads(index_path.read_text())
    for info in index["splits"].values():
        for s in info["shards"]:
            if s["name"] == shard.name:
                s["file_bytes"] = shard.stat().st_size
    index_path.write_text(json.dumps(index))


def _fake_ghostscript(tmp_path: Path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that leaves a file when anything runs it; PIL looks for gs afresh."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "ghostscript-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n0 0 moveto 16 16 lineto stroke\n%%EOF\n"


def _image_bytes(fmt: str, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A real PNG of ``width`` x ``height`` black grayscale pixels: a small file that decodes to width*height bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\0" * ((width + 1) * height), 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# 1. shard names ------------------------------------------------------------------------------------------------


def test_shard_name_with_a_pipe_payload_or_a_path_out_of_the_folder_is_refused(tmp_path, monkeypatch):
    """An index naming a shard ``pipe:<command>`` (with a file of that name beside it, so the index is otherwise
    whole) is refused when read, the stream opens that name as a local file, and the command never runs; a
    name reaching out of the folder is refused too."""
    make_tiny_imagenet(tmp_path / "tin", per_class=2, val=3)
    s = tmp_path / "s"
    write_shards(tiny_imagenet(tmp_path / "tin"), s, max_count=2, workers=1, progress=False)
    shutil.copy(s / "train-000000.tar", s / PAYLOAD)
    index = json.loads((s / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["name"] = PAYLOAD
    (s / "index.json").write_text(json.dumps(index))
    monkeypatch.chdir(s)  # trained with --data.shards=. from inside the folder
    cfg = DataConfig(shards=".", batch_size=2, eval_batch_size=2, workers=0)
    refused = f"index.json: shard name {PAYLOAD!r} is not a plain .tar file name in the shard folder"
    with pytest.raises(ValueError, match=re.escape(refused)):
        data = build_data(cfg, seed=0)
        list(data.train.epoch(0))
    with pytest.raises(ValueError, match=re.escape(f"shard name {PAYLOAD!r} is not a plain .tar file")):
        ShardBatches(".", index, "train", batch_size=2, mean=[0.5] * 3, std=[0.5] * 3, train=True, channels=3)
    assert sum(1 for _ in shard_samples(PAYLOAD, 2)) == 2  # the local file of that name, read as a tar
    assert not (s / "pwned").exists()

    index["splits"]["train"]["shards"][0]["name"] = "../evil.tar"
    shutil.copy(s / "train-000000.tar", tmp_path / "evil.tar")
    (s / "index.json").write_text(json.dumps(index))
    for name in ("../evil.tar", "/etc/evil.tar", ".hidden.tar", "a\0b.tar", "file:train-000000.tar", "sub/x.tar"):
        index["splits"]["train"]["shards"][0]["name"] = name
        (s / "index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=re.escape(f"shard name {name!r} is not a plain .tar file name")):
            read_index(s)


# 2. decoding limits --------------------------------------------------------------------------------------------


def test_image_fields_of_another_format_are_not_decoded(tmp_path, monkeypatch):
    """A ``.jpg`` field holding a GIF, a BMP or an EPS (which PIL would hand to Ghostscript) is one line naming
    shard and key; Ghostscript never runs."""
    marker = _fake_ghostscript(tmp_path, monkeypatch)
    for i in range(4):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / f"c{i % 2}" / f"{i}.jpg").write_bytes(_image_bytes("JPEG", (64, 64)))
    s = tmp_path / "s"
    for fmt, data in (("GIF", _image_bytes("GIF")), ("BMP", _image_bytes("BMP")), ("EPS", EPS)):
        write_shards(image_folder(tmp_path / "imgs"), s, max_count=4, workers=1, progress=False)
        _rewrite(s / "train-000000.tar", "train_00000001.jpg", data)
        with pytest.raises(ValueError) as err:
            list(_stream(s, "train", train=False, batch=4, image_size=64).epoch(0))
        assert str(err.value) == (
            f"{s / 'train-000000.tar'} sample train_00000001: image does not decode (not an image file of the JPEG "
            "format)"
        ), fmt
    assert not marker.exists()


def test_writer_reads_only_image_formats_and_never_runs_ghostscript(tmp_path, monkeypatch):
    """A dataset file named .jpg that is an EPS is an unreadable file to the writer, not a Ghostscript run."""
    marker = _fake_ghostscript(tmp_path, monkeypatch)
    _png_folder(tmp_path / "imgs", n=4)
    (tmp_path / "imgs" / "c0" / "poster.jpg").write_bytes(EPS)
    index = write_shards(
        image_folder(tmp_path / "imgs"), tmp_path / "s", max_count=4, workers=1, on_corrupt="skip", progress=False
    )
    assert index["splits"]["train"]["skipped"] == [
        {
            "file": str(tmp_path / "imgs" / "c0" / "poster.jpg"),
            "error": f"cannot read image {tmp_path / 'imgs' / 'c0' / 'poster.jpg'}: not an image file of the JPEG, "
            "PNG, BMP, GIF or WEBP formats",
        }
    ]
    assert not marker.exists()


def test_decompression_bomb_and_oversized_member_are_refused_before_reading(tmp_path, monkeypatch):
    """A small PNG of 6000x6000 pixels, and a 3 MB member, in shards whose index records images of at most
    200x200 and members of at most 120 kB: one line naming shard, key and the index's limit, before decoding."""
    _png_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "c0" / "big.png").write_bytes(_image_bytes("PNG", (200, 200)))  # sample 4
    s = tmp_path / "s"
    write_shards(image_folder(tmp_path / "imgs"), s, max_count=4, workers=1, progress=False)
    largest = 0
    for shard in ("train-000000.tar", "train-000001.tar"):
        with tarfile.open(s / shard) as tar:
            largest = max(largest, *(m.size for m in tar.getmembers()))
    bomb = _bomb_png(6000, 6000)
    assert len(bomb) < largest  # only its pixels give it away
    _rewrite(s / "train-000001.tar", "train_00000005.png", bomb)
    with pytest.raises(ValueError) as err:
        list(_stream(s, "train", train=False, batch=4, image_size=16).epoch(0))
    assert str(err.value).startswith(
        f"{s / 'train-000001.tar'} sample train_00000005: image is 6000x6000 pixels, more than the largest image "
        "the index records (200x200); the shard was changed after writing"
    )
    assert json.loads((s / "index.json").read_text())["splits"]["train"]["max_member_bytes"] == largest

    write_shards(image_folder(tmp_path / "imgs"), s, max_count=4, workers=1, progress=False)
    _rewrite(s / "train-000000.tar", "train_00000002.json", b" " * 3_000_000)
    with pytest.raises(ValueError) as err:
        list(_stream(s, "train", train=False, batch=4, image_size=16).epoch(0))
    assert str(err.value).startswith(
        f"{s / 'train-000000.tar'} sample train_00000002: its json field is 3,000,000 bytes, more than the largest "
        f"the index records ({largest:,} bytes)"
    )
    # an index written before member sizes were recorded: the global cap
    old = json.loads((s / "index.json").read_text())
    del old["splits"]["train"]["max_member_bytes"]
    (s / "index.json").write_text(json.dumps(old))
    monkeypatch.setattr(safety, "MAX_MEMBER_BYTES", 1_000_000)
    with pytest.raises(ValueError, match=r"its json field is 3,000,000 bytes, more than the 1,000,000 bytes a shard"):
        list(_stream(s, "train", train=False, batch=4, image_size=16).epoch(0))


# 3. hidden files -----------------------------------------------------------------------------------------------


def test_hidden_files_of_a_mac_copy_are_passed_over_and_counted(tmp_path, capsys):
    """Tiny ImageNet copied from a Mac: ``._name.JPEG`` beside each image and ``.DS_Store``; an image folder with
    ``__MACOSX`` and ``.ipynb_checkpoints``. None is read as a sample or a class; the writer says how many."""
    tin = tmp_path / "tin"
    make_tiny_imagenet(tin, per_class=2, val=3)
    junk = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\0" * 64  # an AppleDouble header
    images = sorted(tin.glob("train/*/images/*.JPEG")) + sorted(tin.glob("test/images/*.JPEG"))
    for f in images:
        (f.parent / f"._{f.name}").write_bytes(junk)
    (tin / "train" / "n01443537" / "images" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    hidden = len(images) + 1
    argv = ["--source", "tiny_imagenet", "--root", str(tin), "--out", str(tmp_path / "s"), "--workers", "1"]
    code = main(["shards", *argv])
    out = capsys.readouterr().out
    assert code == 0
    assert f"; {hidden} hidden file(s) passed over (names starting with '.', __MACOSX)" in out
    index = read_index(tmp_path / "s")
    assert index["hidden_files"] == hidden and index["splits"]["train"]["count"] == 6
    assert index["splits"]["test"]["count"] == 2

    folder = _png_folder(tmp_path / "imgs", n=4)
    (folder / "c0" / "._0.png").write_bytes(junk)
    (folder / "__MACOSX" / "c0").mkdir(parents=True)
    (folder / "__MACOSX" / "c0" / "._0.png").write_bytes(junk)
    (folder / ".ipynb_checkpoints").mkdir()
    src = image_folder(folder)
    assert src.classes == ["c0", "c1"] and len(src.splits["train"]) == 4
    assert sorted(Path(p).name for p in src.hidden) == ["._0.png", ".ipynb_checkpoints", "__MACOSX"]


# 4. CIFAR pickles ----------------------------------------------------------------------------------------------


def _py2(obj) -> bytes:
    """A pickle as Python 2's cPickle (protocol 2) writes CIFAR's batches: str as bytes, numpy arrays by
    ``numpy.core.multiarray._reconstruct``."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(n: int) -> bytes:
        return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)

    def dump(v) -> bytes:
        if isinstance(v, dict):
            return b"}(" + b"".join(dump(k) + dump(x) for k, x in v.items()) + b"u"
        if isinstance(v, list):
            return b"](" + b"".join(dump(x) for x in v) + b"e"
        if isinstance(v, bytes | str):
            return s(v.encode() if isinstance(v, str) else v)
        if isinstance(v, int):
            return i(v)
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8
        shape = b"(" + b"".join(i(n) for n in v.shape) + b"t"
        dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1)
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R("
            + i(1) + shape + dtype + i(0) + b"tb" + b"\x89" + s(v.tobytes()) + b"tb"
        )  # fmt: skip

    return b"\x80\x02" + dump(obj) + b"."


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _batch(n: int, label_keys=("labels",)) -> dict:
    batch = {"batch_label": "training batch 1 of 5", "data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8)}
    batch.update({k: [j % 10 for j in range(n)] for k in label_keys})
    return {**batch, "filenames": [f"img_{j}.png" for j in range(n)]}


def test_cifar_pickles_that_run_commands_are_refused_and_real_ones_load(tmp_path, capsys):
    """CIFAR-10 batches in Python 2's format and in Python 3's protocols 2 and 5 load; a data_batch whose pickle
    calls os.system is one line naming the file (exit 2) and the command never runs; CIFAR-100 alike."""
    import pickle

    root = tmp_path / "c10"
    root.mkdir()
    (root / "batches.meta").write_bytes(_py2({"label_names": [f"c{j}" for j in range(10)], "num_vis": 3072}))
    batches = {"data_batch_1": _batch(4), "data_batch_2": _batch(3), "test_batch": _batch(2)}
    (root / "data_batch_1").write_bytes(_py2(batches["data_batch_1"]))
    (root / "data_batch_2").write_bytes(pickle.dumps({k.encode(): v for k, v in batches["data_batch_2"].items()}, 2))
    (root / "test_batch").write_bytes(pickle.dumps({k.encode(): v for k, v in batches["test_batch"].items()}, 5))
    src = cifar(root)
    assert src.classes == [f"c{j}" for j in range(10)] and len(src.splits["train"]) == 7
    first = batches["data_batch_1"]["data"][1].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(src.splits["train"][1].array, first)
    assert [it.label for it in src.splits["test"]] == [0, 1]

    marker = tmp_path / "cifar-payload-ran"
    evil = {b"data": _System(f"touch {marker}"), b"labels": [0]}
    (root / "data_batch_2").write_bytes(pickle.dumps(evil, 2))
    code = main(["shards", "--source", "cifar", "--root", str(root), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"dist-coop: error: {root / 'data_batch_2'} is not a CIFAR python batch: it names " in err
    assert re.search(r"it names (posix|nt|os)\.system, and such a file holds only dicts", err)
    assert not marker.exists() and not (tmp_path / "s").exists()
    for payload in (b"cbuiltins\neval\n(Vprint(1)\ntR.", b"cnumpy.testing._private.utils\nrunstring\n(V1\n}tR."):
        (root / "data_batch_2").write_bytes(payload)
        with pytest.raises(ValueError, match=r"data_batch_2 is not a CIFAR python batch: it names (builtins|numpy)"):
            cifar(root)

    c100 = tmp_path / "c100"
    c100.mkdir()
    (c100 / "meta").write_bytes(_py2({"fine_label_names": ["f"] * 100, "coarse_label_names": ["c"] * 20}))
    for split in ("train", "test"):
        (c100 / split).write_bytes(_py2(_batch(3, ("fine_labels", "coarse_labels"))))
    assert len(cifar(c100, labels="coarse").classes) == 20 and len(cifar(c100).splits["test"]) == 3
    (c100 / "meta").write_bytes(pickle.dumps({b"fine_label_names": _System(f"touch {marker}")}, 2))
    with pytest.raises(ValueError, match=re.escape(f"{c100 / 'meta'} is not a CIFAR python batch: it names ")):
        cifar(c100)
    assert not marker.exists()


# 5. a writer killed, and a full disk ---------------------------------------------------------------------------


def _gone_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_writer_killed_between_its_renames_is_recovered_at_the_next_start(tmp_path):
    """The state a writer killed between moving the old shards aside and the new ones in leaves: the output
    missing, ``.s.old-<pid>`` and ``.s.partial-<pid>-*`` beside it. read_index puts the old shards back; the
    next writer does too and removes what the dead writer left."""
    _png_folder(tmp_path / "imgs")
    s = tmp_path / "s"
    write_shards(image_folder(tmp_path / "imgs"), s, max_count=4, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in s.iterdir()}
    pid = _gone_pid()

    def killed_between_renames() -> None:
        shutil.copytree(s, tmp_path / f".s.partial-{pid}-x1y2")  # the new shards, complete
        s.rename(tmp_path / f".s.old-{pid}")

    killed_between_renames()
    assert read_index(s)["splits"]["train"]["count"] == 8
    assert {p.name: p.read_bytes() for p in s.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".s.partial-{pid}-x1y2", "imgs", "s"]

    shutil.rmtree(tmp_path / f".s.partial-{pid}-x1y2")
    killed_between_renames()
    index = write_shards(image_folder(tmp_path / "imgs"), s, max_count=2, workers=1, progress=False)
    assert len(index["splits"]["train"]["shards"]) == 4 and read_index(s) == index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "s"]
    # the two-rename way itself (file systems that cannot exchange two names in one step)
    shutil.copytree(s, tmp_path / ".s.partial-new")
    (tmp_path / ".s.partial-new" / "index.json").write_text(json.dumps({**index, "source": "new"}))
    swap_into_place(tmp_path / ".s.partial-new", s, exchange=False)
    assert read_index(s)["source"] == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "s"]


def test_shard_files_index_and_folder_reach_the_disk(tmp_path, monkeypatch):
    """Every shard, index.json, the new folder and, after the rename, its parent are fsynced."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _png_folder(tmp_path / "imgs")
    index = write_shards(image_folder(tmp_path / "imgs"), tmp_path / "s", max_count=4, workers=1, progress=False)
    names = {Path(p).name for p in synced}
    assert {s["name"] for s in index["splits"]["train"]["shards"]} | {"index.json"} <= names
    assert any(Path(p).name.startswith(".s.partial-") for p in synced)  # the new folder's entries
    assert synced[-1] == str(tmp_path)  # the parent, after the rename


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_the_old_shards_and_the_next_run_cleans_up(tmp_path):
    """A real SIGKILL of ``dist-coop shards`` while it is blocked reading a validation image (a FIFO, so the
    moment is certain): the old shards stay whole and readable, the hidden partial folder is never read, and
    the next writer removes it."""
    tin = tmp_path / "tin"
    make_tiny_imagenet(tin, per_class=2, val=3)
    s = tmp_path / "s"
    write_shards(tiny_imagenet(tin), s, max_count=2, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in s.iterdir()}
    fifo = tin / "val" / "images" / "val_0.JPEG"
    fifo.unlink()
    os.mkfifo(fifo)
    argv = ["--source", "tiny_imagenet", "--root", str(tin), "--out", str(s), "--workers", "1", "--max-count", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "dist_coop.cli", "shards", *argv], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        for _ in range(1200):  # until the writer has the FIFO open: it wrote the training shards and waits
            try:
                held = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # held open: the writer's read waits on
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.05)
        else:
            pytest.fail("the writer never reached the validation images")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.close(held)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".s.partial-")]
    assert len(partial) == 1 and any(p.suffix == ".tar" for p in partial[0].iterdir())
    assert {p.name: p.read_bytes() for p in s.iterdir()} == before
    assert read_index(s)["splits"]["val"]["count"] == 3
    fifo.unlink()
    _png_folder(tmp_path / "imgs")
    write_shards(image_folder(tmp_path / "imgs"), s, max_count=4, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "s", "tin"]


@pytest.mark.slow
def test_full_disk_is_one_line_naming_the_folder_and_the_old_shards_stay(tmp_path):
    """``dist-coop shards --out`` on a 3 MB tmpfs that cannot hold 4 MB of shards: one line naming the folder and
    what to do, no traceback, no partial shards, the shards there before whole; a mount point as --out is refused."""
    big = _png_folder(tmp_path / "big", n=48, size=160)  # 48 x 77 kB of noise: PNG cannot shrink it
    small = _png_folder(tmp_path / "small", n=4)
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        s = disk / "s"
        write_shards(image_folder(small), s, max_count=2, workers=1, progress=False)
        before = {p.name: p.read_bytes() for p in s.iterdir()}
        argv = ["shards", "--source", "folder", "--root", str(big), "--out", str(s), "--workers", "1"]
        done = subprocess.run([sys.executable, "-m", "dist_coop.cli", *argv], cwd=ROOT, capture_output=True, text=True)
        lines = [
            line
            for line in done.stderr.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith("shards ")
        ]
        assert done.returncode == 1 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"dist-coop: error: no space left on device writing shards to {s} (the disk at ")
        assert lines[0].endswith(
            f"free space there or give --out a folder on a disk with room; the shards in {s} are kept as they were"
        )
        assert sorted(p.name for p in disk.iterdir()) == ["s"]
        assert {p.name: p.read_bytes() for p in s.iterdir()} == before
        with pytest.raises(ValueError, match=re.escape(f"output folder {disk} is a mount point")):
            write_shards(image_folder(small), disk, max_count=2, workers=1, progress=False)
