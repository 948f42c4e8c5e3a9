"""Datasets as users have them on disk, read as (key, image bytes, extension, label) samples.

* Tiny ImageNet as distributed: ``wnids.txt``, ``words.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` + ``val/val_annotations.txt``, unlabeled ``test/images`` (label -1).
* CIFAR-10 / CIFAR-100 python pickle batches as distributed (``data_batch_*``/``test_batch`` +
  ``batches.meta``; ``train``/``test`` + ``meta`` with fine and coarse labels). Pickles are read here
  because that is the format; nothing read back from a shard is ever unpickled.
* Any ``class_name/image`` folder tree (``root/<split>/<class>/...`` or one split ``root/<class>/...``).
* The bundled Fashion-MNIST.

Files that belong to no dataset (names starting with a dot, such as macOS' ``._name.JPEG`` beside each
image and ``.DS_Store``, and ``__MACOSX`` folders) are passed over and listed in ``Source.hidden``.
CIFAR's pickles are read by an unpickler that builds only data (``safety.load_pickle``).

Images that are arrays (CIFAR, Fashion-MNIST) are encoded as PNG by the writer, in parallel; every
image, file or array, is stored in the source's ``mode`` (``images.encode``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dist_coop.data.safety import hidden, load_pickle

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


@dataclass(frozen=True)
class Item:
    """One sample before encoding: a file to read, or an array to encode as PNG."""

    key: str
    label: int
    path: str = ""  # an image file (any format and mode PIL reads)
    array: np.ndarray | None = None  # (H, W) or (H, W, C) uint8


@dataclass
class Source:
    name: str
    classes: list[str]
    splits: dict[str, list[Item]] = field(default_factory=dict)
    class_names: dict[str, str] = field(default_factory=dict)  # e.g. Tiny ImageNet wnid -> words
    mode: str = "RGB"  # the channel mode the shards store every image in (L or RGB)
    hidden: list[str] = field(default_factory=list)  # hidden files and folders passed over in the folders listed


def _listing(folder: Path, passed_over: list[str]) -> list[Path]:
    """The entries of ``folder``, sorted; hidden ones are added to ``passed_over`` instead."""
    entries = sorted(folder.iterdir())
    passed_over += [str(p) for p in entries if hidden(p)]
    return [p for p in entries if not hidden(p)]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} is missing")
    return path


def tiny_imagenet(root: str | Path) -> Source:
    root = Path(root)
    wnids = [w.strip() for w in _need(root / "wnids.txt", "Tiny ImageNet").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in index:
                words[wnid] = text.strip()
    src = Source("tiny_imagenet", wnids, class_names=words)
    train = []
    for wnid in wnids:
        folder = _need(root / "train" / wnid / "images", "Tiny ImageNet train class")
        for f in _listing(folder, src.hidden):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                train.append(Item(f"train/{f.stem}", index[wnid], path=str(f)))
    src.splits["train"] = train
    ann = _need(root / "val" / "val_annotations.txt", "Tiny ImageNet val annotations")
    val = []
    for n, line in enumerate(ann.read_text().splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        name, wnid = parts[0], parts[1]
        if wnid not in index:
            raise ValueError(f"{ann}:{n}: class {wnid!r} is not in wnids.txt")
        val.append(
            Item(
                f"val/{Path(name).stem}",
                index[wnid],
                path=str(_need(root / "val" / "images" / name, "Tiny ImageNet val image")),
            )
        )
    src.splits["val"] = val
    test_dir = root / "test" / "images"
    if test_dir.is_dir():
        src.splits["test"] = [
            Item(f"test/{f.stem}", -1, path=str(f))
            for f in _listing(test_dir, src.hidden)
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS
        ]
    return src


def _unpickle(path: Path) -> dict:
    batch = load_pickle(_need(path, "CIFAR batch"), "a CIFAR python batch")
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR python batch: it holds a {type(batch).__name__}, not a dict")
    return batch


def _get(d: dict, key: str):
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise ValueError(
        f"CIFAR batch has no {key!r} entry (keys: {[k.decode() if isinstance(k, bytes) else k for k in d]})"
    )


def _cifar_items(batch: dict, label_key: str, prefix: str, path: Path) -> list[Item]:
    data = np.asarray(_get(batch, "data"), dtype=np.uint8)
    labels = list(_get(batch, label_key))
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: data {data.shape} and {len(labels)} labels are not CIFAR's (N, 3072) + N")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    names = (
        [n.decode() if isinstance(n, bytes) else str(n) for n in _get(batch, "filenames")]
        if any(k in batch for k in ("filenames", b"filenames"))
        else [str(i) for i in range(len(labels))]
    )
    return [
        Item(f"{prefix}/{Path(n).stem}_{i}", int(lab), array=img)
        for i, (n, lab, img) in enumerate(zip(names, labels, images))
    ]


def cifar(root: str | Path, *, labels: str = "fine") -> Source:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``; ``labels`` fine|coarse)."""
    root = Path(root)
    if (root / "batches.meta").is_file():
        names = [n.decode() for n in _get(_unpickle(root / "batches.meta"), "label_names")]
        src = Source("cifar10", names)
        batches = sorted(root.glob("data_batch_*"))
        if not batches:
            raise FileNotFoundError(f"CIFAR-10: no data_batch_* in {root}")
        src.splits["train"] = [it for b in batches for it in _cifar_items(_unpickle(b), "labels", "train", b)]
        src.splits["test"] = _cifar_items(_unpickle(root / "test_batch"), "labels", "test", root / "test_batch")
    elif (root / "meta").is_file():
        if labels not in ("fine", "coarse"):
            raise ValueError(f"CIFAR-100 labels must be fine or coarse, got {labels!r}")
        names = [n.decode() for n in _get(_unpickle(root / "meta"), f"{labels}_label_names")]
        src = Source(f"cifar100_{labels}", names)
        for split in ("train", "test"):
            src.splits[split] = _cifar_items(_unpickle(root / split), f"{labels}_labels", split, root / split)
    else:
        raise FileNotFoundError(f"{root} holds neither CIFAR-10 (batches.meta) nor CIFAR-100 (meta) python batches")
    for split, items in src.splits.items():
        bad = [it.label for it in items if not 0 <= it.label < len(src.classes)]
        if bad:
            raise ValueError(f"CIFAR {split}: label {bad[0]} out of range [0, {len(src.classes)})")
    return src


def class_tree(
    root: str | Path, exts: set[str], what: str, passed_over: list[str] | None = None
) -> tuple[list[str], dict[str, list[tuple[int, Path]]]]:
    """Classes and ``{split: [(class index, file)]}`` of ``root/<split>/<class>/file`` or ``root/<class>/file``.

    The nested layout is recognised when every sub-folder holds only class folders; otherwise the
    sub-folders are the classes of one split, 'train'. Files are those whose suffix is in ``exts``;
    hidden files and folders are left out (and added to ``passed_over``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root} is missing")
    seen: list[str] = []

    def files(d: Path, out: list[str]) -> list[Path]:
        return [f for f in _listing(d, out) if f.is_file() and f.suffix.lower() in exts]

    def dirs(d: Path) -> list[Path]:
        return [x for x in _listing(d, seen) if x.is_dir()]

    subdirs = dirs(root)
    nested = subdirs and all(not files(d, []) and any(c.is_dir() for c in _listing(d, [])) for d in subdirs)
    split_dirs = {d.name: d for d in subdirs} if nested else {"train": root}
    class_dirs = {split: dirs(d) for split, d in split_dirs.items()}
    classes = sorted({c.name for cs in class_dirs.values() for c in cs})
    if not classes:
        raise ValueError(f"{root}: no class folders of {what} files found")
    index = {c: i for i, c in enumerate(classes)}
    splits = {split: [(index[c.name], f) for c in cs for f in files(c, seen)] for split, cs in class_dirs.items()}
    if passed_over is not None:
        passed_over += sorted(set(seen))
    return classes, splits


def image_folder(root: str | Path) -> Source:
    """``root/<split>/<class>/img`` or ``root/<class>/img`` (one split 'train')."""
    passed_over: list[str] = []
    classes, splits = class_tree(root, IMAGE_EXTS, "image", passed_over)
    src = Source("image_folder", classes, hidden=passed_over)
    for split, files in splits.items():
        src.splits[split] = [Item(f"{split}/{f.parent.name}/{f.stem}", label, path=str(f)) for label, f in files]
    return src


def bundled(root: str | Path = "") -> Source:
    """The bundled Fashion-MNIST (Debian's dataset-fashion-mnist)."""
    from dist_coop.data import fashion_mnist

    src = Source("fashion_mnist", list(fashion_mnist.CLASSES), mode="L")
    for split, name in (("train", "train"), ("test", "test")):
        images, labels = fashion_mnist.load_split(split, root)
        src.splits[name] = [
            Item(f"{split}/{i:05d}", int(lab), array=img[0].numpy()) for i, (img, lab) in enumerate(zip(images, labels))
        ]
    return src


SOURCES: dict[str, Callable[..., Source]] = {
    "tiny_imagenet": tiny_imagenet,
    "cifar": cifar,
    "folder": image_folder,
    "bundled": bundled,
}
