"""A folder in Tiny ImageNet's on-disk layout, at its real size, for throughput checks where the dataset cannot
be downloaded (the GPU check, ``benchmarks/gpu_check.sh``).

    python benchmarks/make_tiny_imagenet.py --out /tmp/tin [--classes 200] [--per-class 500] [--val 10000]

Writes ``<out>/tiny-imagenet-200/``: ``wnids.txt``, ``words.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG``
(+ an empty ``<wnid>_boxes.txt``), ``val/images/val_<i>.JPEG`` with ``val/val_annotations.txt``, and a few
``test/images``, all 64x64 RGB JPEGs: what ``dist-coop shards --source tiny_imagenet`` reads. The defaults
are the real dataset's counts (200 classes x 500 training images, 10k validation). Each class is a colour with
noise, so a net learns something and a broken input path shows as a loss that does not fall; the pixels are
not ImageNet's, so accuracy on it means nothing, only the speed does.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _class_colour(c: int) -> np.ndarray:
    return np.random.default_rng(1000 + c).integers(30, 226, 3)


def _write(job: tuple[str, int, int]) -> None:
    path, label, seed = job
    rng = np.random.default_rng(seed)
    a = np.clip(_class_colour(label) + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path, format="JPEG", quality=90)


def make(out: Path, classes: int, per_class: int, val: int, test: int = 10, workers: int = 0) -> Path:
    root = out / "tiny-imagenet-200"
    if root.exists():
        raise SystemExit(f"{root} exists; remove it first")
    wnids = [f"n{10_000_000 + c:08d}" for c in range(classes)]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tclass {c}\n" for c, w in enumerate(wnids)))
    jobs: list[tuple[str, int, int]] = []
    for c, w in enumerate(wnids):
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        jobs += [(str(folder / f"{w}_{i}.JPEG"), c, c * per_class + i) for i in range(per_class)]
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    lines = []
    for i in range(val):
        c = i % classes
        jobs.append((str(root / "val" / "images" / f"val_{i}.JPEG"), c, 10**8 + i))
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    jobs += [(str(root / "test" / "images" / f"test_{i}.JPEG"), 0, 2 * 10**8 + i) for i in range(test)]
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=512))
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--val", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=0, help="processes (0 = one per core)")
    a = p.parse_args()
    root = make(a.out, a.classes, a.per_class, a.val, workers=a.workers)
    print(f"wrote {a.classes * a.per_class} training and {a.val} validation images under {root}")


if __name__ == "__main__":
    main()
