"""``dist-coop shards``: write a dataset as webdataset tar shards plus an index.

A sample is ``<key>.<jpg|png>`` (the image bytes), ``<key>.cls`` (the class index as text) and
``<key>.json`` (original name and label). ``index.json`` holds the class list, the channel mode and,
per split, the shards with their sample counts and file sizes, the image sizes seen, how many images
were converted to the mode and which files were skipped: the stream plans its steps from it without
opening a tar. Every sample is decoded once while writing (``images.encode``, in parallel over the
cores); one writer keeps the shard order deterministic. The shards are written into a hidden sibling
folder that is moved into place only when complete, so a failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dist_coop.data.images import MODES, Encoded, channel_stats, encode
from dist_coop.data.sources import Item, Source

INDEX = "index.json"
FORMAT = "dist_coop-shards-1"
ON_CORRUPT = ("error", "skip")


def _encoded(items: list[Item], mode: str, workers: int) -> Iterator[Encoded]:
    fn = partial(encode, mode=mode)
    if workers <= 1:
        yield from map(fn, items)
        return
    with get_context("spawn" if os.name != "posix" else "fork").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=64)


def write_split(
    items: list[Item],
    out_dir: Path,
    split: str,
    *,
    mode: str = "RGB",
    max_count: int,
    max_bytes: int,
    workers: int,
    on_corrupt: str = "error",
    progress: bool = True,
) -> dict[str, Any]:
    """Write one split as ``<split>-000000.tar`` ...; returns its index entry.

    The entry: ``count``, ``shards`` ([{name, count, bytes (image bytes), file_bytes}]), ``sizes``
    ({"WxH": n}), ``converted`` ({stored mode: n}) and ``skipped`` ([{file, error}], on_corrupt skip).
    A file that cannot be read raises a ValueError naming it (on_corrupt error).
    """
    import webdataset as wds

    shards: list[dict[str, Any]] = []
    sizes: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    skipped: list[dict[str, str]] = []
    writer, count, size, written = None, 0, 0, 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            shards[-1].update(count=count, bytes=size, file_bytes=(out_dir / shards[-1]["name"]).stat().st_size)
            writer = None

    for enc in tqdm(
        _encoded(items, mode, workers), total=len(items), desc=f"shards {split}", disable=not progress, leave=False
    ):
        if enc.error:
            if on_corrupt == "error":
                if writer is not None:
                    writer.close()
                raise ValueError(f"{enc.error} (--on-corrupt skip leaves such files out and lists them in {INDEX})")
            skipped.append({"file": enc.source, "error": enc.error})
            continue
        if writer is not None and (
            (max_count and count >= max_count) or (max_bytes and size + len(enc.data) > max_bytes)
        ):
            close()
        if writer is None:
            name = f"{split}-{len(shards):06d}.tar"
            shards.append({"name": name})
            writer, count, size = wds.TarWriter(str(out_dir / name)), 0, 0
        writer.write(
            {
                "__key__": f"{split}_{written:08d}",
                enc.ext: enc.data,
                "cls": str(enc.label).encode(),
                "json": json.dumps({"key": enc.key, "label": enc.label}).encode(),
            }
        )
        count, size, written = count + 1, size + len(enc.data), written + 1
        sizes[f"{enc.size[0]}x{enc.size[1]}"] += 1
        if enc.converted_from:
            converted[enc.converted_from] += 1
    close()
    return {
        "count": written,
        "shards": shards,
        "sizes": dict(sizes.most_common()),
        "converted": dict(converted),
        "skipped": skipped,
    }


def write_shards(
    source: Source,
    out_dir: str | Path,
    *,
    max_count: int = 10_000,
    max_bytes: int = 0,
    workers: int = 0,
    splits: Iterable[str] | None = None,
    limit: int = 0,
    channels: int = 0,
    on_corrupt: str = "error",
    progress: bool = True,
) -> dict[str, Any]:
    """Write every split of ``source`` (or ``splits``) and the index; ``limit`` keeps the first N training samples.

    ``channels`` (1 or 3; 0 = the source's own mode) is the mode every image is stored in. The shards
    are written into a hidden sibling of ``out_dir`` and moved into place when complete; an existing
    ``out_dir`` must be empty or hold shards (it is replaced as a whole, and only on success).
    """
    if max_count <= 0 and max_bytes <= 0:
        raise ValueError("set a shard size: max_count (samples) or max_bytes > 0")
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {list(ON_CORRUPT)}, got {on_corrupt!r}")
    if channels and channels not in MODES:
        raise ValueError(f"channels must be one of {sorted(MODES)} (0 = the dataset's own), got {channels}")
    mode = MODES[channels] if channels else source.mode
    for split in list(splits or source.splits):
        if split not in source.splits:
            raise ValueError(f"split {split!r} not in {source.name} (has {list(source.splits)})")
    out_dir = Path(out_dir).absolute()  # "." too has a parent to hold the temporary sibling
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        index = _write_all(
            source,
            tmp,
            mode=mode,
            splits=list(splits or source.splits),
            limit=limit,
            on_corrupt=on_corrupt,
            progress=progress,
            max_count=max_count,
            max_bytes=max_bytes,
            workers=workers or os.cpu_count() or 1,
        )
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _write_all(source: Source, out_dir: Path, *, mode: str, splits: list[str], limit: int, **kw) -> dict[str, Any]:
    index: dict[str, Any] = {
        "format": FORMAT,
        "source": source.name,
        "classes": source.classes,
        "class_names": source.class_names,
        "mode": mode,
        "splits": {},
    }
    for split in splits:
        items = source.splits[split][: limit or None] if split == "train" else source.splits[split]
        index["splits"][split] = write_split(items, out_dir, split, mode=mode, **kw)
    stats_split = "train" if "train" in source.splits else next(iter(source.splits))
    index["mean"], index["std"] = channel_stats(source.splits[stats_split][:1000], mode)
    (out_dir / INDEX).write_text(json.dumps(index, indent=1))
    return index


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that exists and holds anything but shards: it would be replaced."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file")
    other = sorted(p.name for p in out_dir.iterdir() if not (p.is_file() and (p.suffix == ".tar" or p.name == INDEX)))
    if other:
        raise ValueError(
            f"output folder {out_dir} holds files that are not shards ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}); give a new or empty folder, or one written by dist-coop shards"
        )


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """``tmp`` becomes ``out_dir``; an old ``out_dir`` is removed only once the new one is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def check_image_sizes(index: dict[str, Any], splits: Iterable[str], image_size: int, where: str | Path) -> None:
    """Refuse ``data.image_size: 0`` (keep images as stored) for a split whose images are not all one size."""
    if image_size:
        return
    for split in splits:
        sizes = index["splits"].get(split, {}).get("sizes", {})  # absent in indexes written before sizes were kept
        if len(sizes) > 1:
            seen = ", ".join(f"{s} ({n})" for s, n in sizes.items())
            common = max(int(v) for v in next(iter(sizes)).split("x"))
            raise ValueError(
                f"data.image_size is 0 (images as stored) but split {split!r} of the shards in {where} holds "
                f"images of {len(sizes)} sizes (width x height: count): {seen}; set data.image_size to resize them "
                f"all to one square size (e.g. data.image_size: {common})"
            )


def read_index(path: str | Path) -> dict[str, Any]:
    """Load and check ``index.json`` (a folder holding it, or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"shard index not found: {path} (write shards with `dist-coop shards`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a dist_coop shard index (format {index.get('format')!r})")
    for split, info in index["splits"].items():
        total = sum(s["count"] for s in info["shards"])
        if total != info["count"]:
            raise ValueError(f"{path}: split {split!r} says {info['count']} samples but its shards hold {total}")
        for s in info["shards"]:
            shard = path.parent / s["name"]
            if not shard.is_file():
                raise FileNotFoundError(f"{path}: shard {s['name']} listed in the index is missing")
            if "file_bytes" in s and shard.stat().st_size != s["file_bytes"]:
                raise ValueError(
                    f"shard {shard} is {shard.stat().st_size} bytes, the index says {s['file_bytes']}: it was cut "
                    "short (an interrupted copy?) or changed after writing; copy or write the shards again"
                )
    return index
