"""``dist-coop shards``: write a dataset as webdataset tar shards plus an index.

A sample is ``<key>.<jpg|png>`` (the image bytes), ``<key>.cls`` (the class index as text) and
``<key>.json`` (original name and label). ``index.json`` holds the class list, the channel mode and,
per split, the shards with their sample counts and file sizes, the image sizes seen, the largest tar
member, how many images were converted to the mode and which files were skipped, and how many hidden
files the source passed over: the stream plans its steps (and its limits) from it without opening a tar.
Every sample is decoded once while writing (``images.encode``, in parallel over the cores); one writer
keeps the shard order deterministic. The shards are written into a hidden sibling folder, fsynced and
swapped into place only when complete (``swap``), so a failed or killed run leaves nothing that
looks finished, and a full disk is one line naming the folder. ``read_index`` checks an index from
anyone: its shard names are plain file names in its folder (``safety.check_shard_name``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dist_coop.choices import ON_CORRUPT
from dist_coop.data import swap
from dist_coop.data.images import MODES, Encoded, channel_stats, encode
from dist_coop.data.safety import check_shard_name
from dist_coop.data.sources import Item, Source
from dist_coop.durable import DiskFullError, disk_full_line, fsync_tree, is_disk_full

INDEX = "index.json"
FORMAT = "dist_coop-shards-1"


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
    ({"WxH": n}), ``max_member_bytes`` (the largest tar member), ``converted`` ({stored mode: n}) and
    ``skipped`` ([{file, error}], on_corrupt skip).
    A file that cannot be read raises a ValueError naming it (on_corrupt error).
    """
    import webdataset as wds

    shards: list[dict[str, Any]] = []
    sizes: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    skipped: list[dict[str, str]] = []
    writer, file, count, size, written, max_member = None, None, 0, 0, 0, 0

    def close() -> None:
        nonlocal writer, file
        if writer is not None:
            writer.close()
            file.close()
            shards[-1].update(count=count, bytes=size, file_bytes=(out_dir / shards[-1]["name"]).stat().st_size)
            writer = file = None

    try:
        for enc in tqdm(
            _encoded(items, mode, workers), total=len(items), desc=f"shards {split}", disable=not progress, leave=False
        ):
            if enc.error:
                if on_corrupt == "error":
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
                file = open(out_dir / name, "wb")  # a local file: never a URL for webdataset to open
                writer, count, size = wds.TarWriter(file), 0, 0
            fields = {
                enc.ext: enc.data,
                "cls": str(enc.label).encode(),
                "json": json.dumps({"key": enc.key, "label": enc.label}).encode(),
            }
            writer.write({"__key__": f"{split}_{written:08d}", **fields})
            max_member = max(max_member, *map(len, fields.values()))
            count, size, written = count + 1, size + len(enc.data), written + 1
            sizes[f"{enc.size[0]}x{enc.size[1]}"] += 1
            if enc.converted_from:
                converted[enc.converted_from] += 1
        close()
    except BaseException:
        _abandon(writer, file)
        raise
    return {
        "count": written,
        "shards": shards,
        "sizes": dict(sizes.most_common()),
        "max_member_bytes": max_member,
        "converted": dict(converted),
        "skipped": skipped,
    }


def _abandon(writer: Any, file: Any) -> None:
    """Close a shard left half-written by a failure (a full disk, a bad file): what it still buffered is dropped
    here, not flushed (and failing again) when the objects are collected."""
    for close in (writer.tarstream.close if writer else None, file.close if file else None):
        if close is not None:
            with contextlib.suppress(OSError, ValueError):
                close()


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
    ``out_dir`` must be empty or hold shards (it is replaced as a whole, and only on success). A disk
    that fills up is a DiskFullError naming the folder and its disk; ``out_dir`` is then as it was.
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
    swap.remove_stale(out_dir)
    _check_out_dir(out_dir)
    kept, tmp = out_dir.exists(), None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = swap.partial_dir(out_dir)
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
        fsync_tree(tmp)
        swap.swap_into_place(tmp, out_dir)
    except BaseException as e:
        written = swap.tree_bytes(tmp)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(
                f"no space left on device writing shards to {out_dir} ({disk_full_line(out_dir.parent)}; "
                f"{written / 1e6:.1f} MB written before it filled, removed again): free space there or give --out "
                "a folder on a disk with room" + (f"; the shards in {out_dir} are kept as they were" if kept else "")
            ) from e
        raise
    return index


def _write_all(source: Source, out_dir: Path, *, mode: str, splits: list[str], limit: int, **kw) -> dict[str, Any]:
    index: dict[str, Any] = {
        "format": FORMAT,
        "source": source.name,
        "hidden_files": len(source.hidden),
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
    if os.path.ismount(out_dir):
        raise ValueError(
            f"output folder {out_dir} is a mount point, which cannot be replaced as a whole; give a folder inside "
            f"it (e.g. --out {out_dir / 'shards'})"
        )
    other = sorted(p.name for p in out_dir.iterdir() if not (p.is_file() and (p.suffix == ".tar" or p.name == INDEX)))
    if other:
        raise ValueError(
            f"output folder {out_dir} holds files that are not shards ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}); give a new or empty folder, or one written by dist-coop shards"
        )


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


def _well_formed(info: Any) -> bool:
    def count(d: Any) -> bool:
        return isinstance(d, dict) and isinstance(d.get("count"), int) and d["count"] >= 0

    return count(info) and isinstance(info.get("shards"), list) and all(count(s) for s in info["shards"])


def read_index(path: str | Path) -> dict[str, Any]:
    """Load and check ``index.json`` (a folder holding it, or the file). A folder that a killed writer left
    set aside is put back first (``swap.recover``)."""
    path = Path(path)
    folder = path.parent if path.name == INDEX and not path.is_dir() else path
    if not folder.exists() and not swap.recover(folder.absolute()) and swap.set_aside(folder.absolute()):
        old = swap.set_aside(folder.absolute())[0]
        raise FileNotFoundError(
            f"shard folder {folder} is missing: a shard writer was stopped while replacing it and the shards it "
            f"held are in {old}, which could not be renamed back; rename that folder to {folder}"
        )
    if path.is_dir():
        path = path / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"shard index not found: {path} (write shards with `dist-coop shards`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path}: not a dist_coop shard index (format {found!r})")
    splits = index.get("splits")
    if not isinstance(splits, dict) or not all(_well_formed(info) for info in splits.values()):
        raise ValueError(
            f"{path}: its splits are not a dist_coop shard index's (counts and shard lists); write the shards again"
        )
    for split, info in splits.items():
        for s in info["shards"]:
            check_shard_name(s["name"], path)
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
