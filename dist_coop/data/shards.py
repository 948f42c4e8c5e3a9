"""``dist-coop shards``: write a dataset as webdataset tar shards plus an index.

A sample is ``<key>.<jpg|png>`` (the image bytes), ``<key>.cls`` (the class index as text) and
``<key>.json`` (original name and label). ``index.json`` holds the class list and, per split, the
shards with their sample counts: the stream plans its steps from it without opening a tar.
Encoding (reading files, PNG-encoding arrays) runs in parallel over the cores; one writer keeps
the shard order deterministic.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dist_coop.data.sources import Item, Source

INDEX = "index.json"
FORMAT = "dist_coop-shards-1"


def encode(item: Item) -> tuple[str, str, bytes, int]:
    """(key, extension, image bytes, label): file bytes as they are, arrays as PNG."""
    if item.array is not None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(item.array)).save(buf, format="PNG")
        return item.key, "png", buf.getvalue(), item.label
    ext = Path(item.path).suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg"}.get(ext, ext)
    try:
        data = Path(item.path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read image {item.path}: {e}") from e
    return item.key, ext, data, item.label


def _encoded(items: list[Item], workers: int) -> Iterable[tuple[str, str, bytes, int]]:
    if workers <= 1:
        yield from map(encode, items)
        return
    with get_context("spawn" if os.name != "posix" else "fork").Pool(workers) as pool:
        yield from pool.imap(encode, items, chunksize=64)


def write_split(
    items: list[Item], out_dir: Path, split: str, *, max_count: int, max_bytes: int, workers: int, progress: bool = True
) -> list[dict[str, Any]]:
    """Write one split as ``<split>-000000.tar`` ...; returns [{name, count, bytes}] per shard."""
    import webdataset as wds

    shards: list[dict[str, Any]] = []
    writer, count, size = None, 0, 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            shards[-1].update(count=count, bytes=size)
            writer = None

    for i, (key, ext, data, label) in enumerate(
        tqdm(_encoded(items, workers), total=len(items), desc=f"shards {split}", disable=not progress, leave=False)
    ):
        if writer is not None and ((max_count and count >= max_count) or (max_bytes and size + len(data) > max_bytes)):
            close()
        if writer is None:
            name = f"{split}-{len(shards):06d}.tar"
            shards.append({"name": name})
            writer, count, size = wds.TarWriter(str(out_dir / name)), 0, 0
        sample_key = f"{split}_{i:08d}"
        writer.write(
            {
                "__key__": sample_key,
                ext: data,
                "cls": str(label).encode(),
                "json": json.dumps({"key": key, "label": label}).encode(),
            }
        )
        count, size = count + 1, size + len(data)
    close()
    return shards


def write_shards(
    source: Source,
    out_dir: str | Path,
    *,
    max_count: int = 10_000,
    max_bytes: int = 0,
    workers: int = 0,
    splits: Iterable[str] | None = None,
    limit: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every split of ``source`` (or ``splits``) and the index; ``limit`` keeps the first N training samples."""
    if max_count <= 0 and max_bytes <= 0:
        raise ValueError("set a shard size: max_count (samples) or max_bytes > 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    index: dict[str, Any] = {
        "format": FORMAT,
        "source": source.name,
        "classes": source.classes,
        "class_names": source.class_names,
        "splits": {},
    }
    for split in list(splits or source.splits):
        if split not in source.splits:
            raise ValueError(f"split {split!r} not in {source.name} (has {list(source.splits)})")
        items = source.splits[split][: limit or None] if split == "train" else source.splits[split]
        shards = write_split(
            items, out_dir, split, max_count=max_count, max_bytes=max_bytes, workers=workers, progress=progress
        )
        index["splits"][split] = {"count": len(items), "shards": shards}
    stats_split = "train" if "train" in source.splits else next(iter(source.splits))
    index["mean"], index["std"] = channel_stats(source.splits[stats_split][:1000])
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out_dir / INDEX)
    return index


def channel_stats(items: list[Item]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels in [0, 1] over ``items`` (for normalisation)."""
    from PIL import Image

    arrays = []
    for it in items:
        a = it.array if it.array is not None else np.asarray(Image.open(it.path))
        arrays.append((a[..., None] if a.ndim == 2 else a).reshape(-1, a.shape[-1] if a.ndim == 3 else 1) / 255.0)
    if not arrays:
        return [0.5], [0.5]
    pixels = np.concatenate(arrays)
    return [round(float(v), 4) for v in pixels.mean(0)], [round(float(v), 4) for v in pixels.std(0) + 1e-6]


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
            if not (path.parent / s["name"]).is_file():
                raise FileNotFoundError(f"{path}: shard {s['name']} listed in the index is missing")
    return index
