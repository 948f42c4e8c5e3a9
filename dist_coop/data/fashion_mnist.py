"""The bundled real dataset: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.

70k 28x28 grayscale images in 10 classes, as the standard IDX ``.gz`` files. Parsed with numpy
and gzip (0.4 s for all of it), so it needs no download and no torchvision.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MEAN, STD = (0.2860,), (0.3530,)  # over the training split, pixels in [0, 1]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HOW_TO_GET = (
    "install Debian's package (as root: apt-get install -y dataset-fashion-mnist), or set data.root "
    "to a folder holding the standard IDX files {files}"
)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or plain): magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


def find_root(root: str | Path = "") -> Path:
    root = Path(root) if root else DEFAULT_ROOT
    missing = [name for pair in FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {missing}); "
            + HOW_TO_GET.format(files=[n for pair in FILES.values() for n in pair])
        )
    return root


def load_split(split: str, root: str | Path = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of ``split`` ('train' or 'test')."""
    if split not in FILES:
        raise ValueError(f"split must be one of {list(FILES)}, got {split!r}")
    base = find_root(root)
    images = read_idx(base / FILES[split][0])
    labels = read_idx(base / FILES[split][1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{base}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{base / FILES[split][1]}: label {labels.max()} out of range [0, {len(CLASSES)})")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
