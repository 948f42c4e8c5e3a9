"""Atomic checkpoints, loaded with ``torch.load(weights_only=True)``.

A checkpoint is one dict of tensors and plain Python values: every net's state dict, every
optimizer / scheduler state, the trainer position (step, epoch, batch within the epoch), RNG
states and the resolved config. It is written to a temporary file in the same folder and
renamed over the target, so a crash mid-write never leaves a half-written checkpoint; the file and the folder
are flushed to disk before it counts as written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dist_coop.distributed.safe_load import load_weights_only
from dist_coop.durable import fsync_dir


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power cut
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_weights_only(path, map_location)  # a truncated file or a pickle that is not weights-only: one line
