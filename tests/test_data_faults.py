"""Real-world inputs: images in any colour mode, files that do not decode, mixed sizes, cut shards.

Every input is a real file made here: JPEG/PNG files written by PIL in the modes datasets hold them
(grayscale and CMYK JPEGs, palette, RGBA, LA and 16-bit PNGs), a JPEG with its tail cut off, a text
file named .jpg and a tar shard cut in the middle of a member.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_coop.cli import main
from dist_coop.config import DataConfig
from dist_coop.data import build_data
from dist_coop.data.shards import read_index, write_shards
from dist_coop.data.sources import image_folder
from tests.test_shards import _stream, make_tiny_imagenet

RNG = np.random.default_rng(1)


def _save(path: Path, img: Image.Image, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def _rgb(size=(8, 8)) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _shards(argv: list[str], capsys) -> tuple[int, str]:
    """``dist-coop shards ...``: exit code and stderr without the progress bars."""
    code = main(["shards", "--max-count", "2", "--workers", "1", *argv])
    err = capsys.readouterr().err
    return code, "\n".join(
        line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("shards ")
    )


def test_every_colour_mode_is_stored_in_the_datasets_mode(tmp_path, capsys):
    """1. Grayscale/CMYK JPEGs in Tiny ImageNet become RGB; a folder tree becomes L with --channels 1."""
    tin = tmp_path / "tin"
    wnids = make_tiny_imagenet(tin, per_class=2, val=3)
    _save(tin / "train" / wnids[0] / "images" / f"{wnids[0]}_0.JPEG", Image.new("L", (64, 64), 90), "JPEG")
    _save(tin / "train" / wnids[1] / "images" / f"{wnids[1]}_1.JPEG", _rgb((64, 64)).convert("CMYK"), "JPEG")
    assert _shards(["--source", "tiny_imagenet", "--root", str(tin), "--out", str(tmp_path / "s")], capsys) == (0, "")
    index = read_index(tmp_path / "s")
    assert index["mode"] == "RGB" and len(index["mean"]) == 3
    assert index["splits"]["train"]["converted"] == {"L": 1, "CMYK": 1} and index["splits"]["val"]["converted"] == {}
    stream = _stream(tmp_path / "s", "train", train=False, batch=6)
    x, _ = next(stream.epoch(0))
    assert x.shape == (6, 3, 64, 64)
    gray = x[0] * torch.tensor(stream.std)[:, None, None] + torch.tensor(stream.mean)[:, None, None]
    assert torch.allclose(gray, torch.full_like(gray, 90 / 255), atol=1e-3)  # the grayscale JPEG: 3 equal channels

    folder = tmp_path / "folder" / "a"
    _save(folder / "rgb.jpg", _rgb(), "JPEG")
    _save(folder / "rgba.png", _rgb().convert("RGBA"), "PNG")
    _save(folder / "palette.png", _rgb().convert("P"), "PNG")
    _save(folder / "la.png", Image.new("LA", (8, 8), (40, 128)), "PNG")
    _save(folder / "wide.png", Image.fromarray(np.full((8, 8), 32896, np.uint16)), "PNG")  # 16-bit: 32896 / 257 = 128
    assert Image.open(folder / "wide.png").mode == "I;16"
    argv = ["--source", "folder", "--root", str(tmp_path / "folder"), "--out", str(tmp_path / "g"), "--channels", "1"]
    assert _shards(argv, capsys)[0] == 0
    index = read_index(tmp_path / "g")
    assert index["mode"] == "L" and len(index["mean"]) == 1
    assert index["splits"]["train"]["converted"] == {"LA": 1, "P": 1, "RGB": 1, "RGBA": 1, "I;16": 1}
    stream = _stream(tmp_path / "g", "train", train=False, batch=5)
    x, _ = next(stream.epoch(0))
    assert x.shape == (5, 1, 8, 8)
    pixels = x * stream.std[0] + stream.mean[0]  # back to [0, 1]
    assert abs(float(pixels[-1].mean()) - 128 / 255) < 1e-3  # scaled, not clipped to 255
    assert abs(float(pixels[0].mean()) - 40 / 255) < 1e-3  # LA: the gray, the alpha dropped
    # the default for a folder is RGB
    assert (
        _shards(["--source", "folder", "--root", str(tmp_path / "folder"), "--out", str(tmp_path / "c")], capsys)[0]
        == 0
    )
    assert read_index(tmp_path / "c")["splits"]["train"]["converted"] == {"LA": 1, "P": 1, "RGBA": 1, "I;16": 1}


def test_unreadable_files_stop_the_writer_naming_them_or_are_skipped(tmp_path, capsys):
    """2. A truncated JPEG and a text file named .jpg: one error line naming the file (exit 2), no
    finished-looking folder, an existing one left whole; --on-corrupt skip lists them in index.json."""
    root = tmp_path / "imgs" / "cls"
    for i in range(4):
        _save(root / f"good{i}.jpg", _rgb(), "JPEG")
    out = tmp_path / "s"
    argv = ["--source", "folder", "--root", str(tmp_path / "imgs"), "--out", str(out)]
    assert _shards(argv, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    jpeg = (root / "good0.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.jpg").write_text("shopping list, not an image\n")
    code, err = _shards(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("dist-coop: error: ")
    assert f"{root / 'cut.jpg'}: image file is truncated" in err or f"{root / 'cut.jpg'}: Truncated" in err
    assert "--on-corrupt skip" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old shards, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "s"]  # no partial folder left behind
    fresh = ["--source", "folder", "--root", str(tmp_path / "imgs"), "--out", str(tmp_path / "new")]
    assert _shards(fresh, capsys)[0] == 2 and not (tmp_path / "new").exists()

    assert _shards([*argv, "--on-corrupt", "skip"], capsys)[0] == 0
    index = read_index(out)
    split = index["splits"]["train"]
    assert split["count"] == 4 and [s["file"] for s in split["skipped"]] == [
        str(root / "cut.jpg"),
        str(root / "notes.jpg"),
    ]
    assert "not an image file" in split["skipped"][1]["error"]
    assert sum(len(y) for _, y in _stream(out, "train", train=False, batch=2).epoch(0)) == 4

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    code, err = _shards(
        ["--source", "folder", "--root", str(tmp_path / "imgs"), "--out", str(tmp_path / "mine")], capsys
    )
    assert code == 2 and "holds files that are not shards (thesis.tex)" in err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def test_mixed_image_sizes_are_recorded_and_refused_without_image_size(tmp_path):
    """3. index.json holds the sizes seen; data.image_size: 0 on mixed sizes is refused before training."""
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            _save(tmp_path / "imgs" / split / f"c{i % 2}" / f"{i}.png", _rgb((12, 10) if i == 3 else (8, 8)), "PNG")
    index = write_shards(image_folder(tmp_path / "imgs"), tmp_path / "s", max_count=2, workers=1, progress=False)
    assert index["splits"]["train"]["sizes"] == {"8x8": 3, "12x10": 1} and index["splits"]["val"]["sizes"] == {"8x8": 2}
    cfg = DataConfig(shards=str(tmp_path / "s"), batch_size=2, eval_batch_size=2, workers=0)
    with pytest.raises(ValueError, match=r"data.image_size is 0 .* split 'train' .* 8x8 \(3\), 12x10 \(1\); set data."):
        build_data(cfg, seed=0)
    data = build_data(DataConfig(shards=str(tmp_path / "s"), batch_size=2, eval_batch_size=2, image_size=8), seed=0)
    assert {tuple(x.shape) for x, _ in data.train.epoch(0)} == {(2, 3, 8, 8)}
    # shards written before sizes were recorded: the stream names the sample and the setting
    old = json.loads((tmp_path / "s" / "index.json").read_text())
    del old["splits"]["train"]["sizes"]
    (tmp_path / "s" / "index.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"sample train_00000003: image is 12x10 but the batch holds 8x8 .*image_size"):
        list(_stream(tmp_path / "s", "train", train=False, batch=4, augment=False).epoch(0))


def test_cut_shard_and_corrupt_sample_are_one_line_also_from_a_worker(tmp_path):
    """4. A shard cut mid-member, and a sample that does not decode: one line naming shard (and sample),
    in-process and from a DataLoader worker; read_index refuses a shard whose size is not the index's."""
    for i in range(8):
        _save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.jpg", _rgb(), "JPEG")
    write_shards(image_folder(tmp_path / "imgs"), tmp_path / "s", max_count=4, workers=1, progress=False)
    shard = tmp_path / "s" / "train-000000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2 + 100])  # mid-member: tarfile's ReadError
    with pytest.raises(ValueError, match=r"train-000000.tar is \d+ bytes, the index says \d+"):
        read_index(tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    for s in index["splits"]["train"]["shards"]:
        del s["file_bytes"]  # as written before file sizes were recorded: found while streaming
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    for workers in (0, 1):
        with pytest.raises(ValueError) as err:
            list(_stream(tmp_path / "s", "train", train=False, batch=2, workers=workers).epoch(0))
        msg = str(err.value)
        assert "\n" not in msg and "Traceback" not in msg and "DataLoader worker" not in msg
        assert f"{shard}: shard is truncated or corrupt after sample train_0000000" in msg
    stream = _stream(tmp_path / "s", "train", train=False, batch=2, on_corrupt="skip")
    with pytest.warns(UserWarning, match="skipping the rest of a corrupt shard"):
        n = sum(len(y) for _, y in stream.epoch(0))
    assert n + stream.skipped == 8 and stream.skipped >= 1

    shard.write_bytes(whole)
    good = tmp_path / "s" / "train-000001.tar"
    data = good.read_bytes()
    start = data.index(b"\xff\xd8\xff")  # the first JPEG in the shard: same size, garbage bytes
    good.write_bytes(data[:start] + b"\0" * 64 + data[start + 64 :])
    with pytest.raises(ValueError) as err:
        list(_stream(tmp_path / "s", "train", train=False, batch=2, workers=1).epoch(0))
    msg = str(err.value)
    assert "\n" not in msg and f"{good} sample train_00000004: image does not decode" in msg
