"""What the tests share: the tiny config and a tracker that records what it is given.

The tiny config trains three 4-channel ResNet-20s on 256 real Fashion-MNIST images (8 steps per epoch,
2 epochs): a whole run in seconds on a CPU. ``RANKS`` adds what runs of up to 6 ranks need (every rank
gets batches: 512 images, batch 16, one epoch, one thread per rank).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from dist_coop.config import Config, load_config

TINY = [
    "--model.name=resnet20",
    "--model.width=4",
    "--model.in_channels=1",
    "--coop.scaling_factors=[0.25, 0.5, 1.0]",
    "--data.train_subset=256",
    "--data.val_subset=200",
    "--data.batch_size=32",
    "--data.eval_batch_size=100",
    "--train.epochs=2",
    "--train.progress=false",
    "--train.log_every=1",
    "--tracking.backend=none",
]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_benchmark(name: str, folder: Path = BENCHMARKS) -> ModuleType:
    """``benchmarks/<name>.py`` (or ``<folder>/<name>.py``) as a module, imported as when run as a script (its
    siblings importable)."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def load_experiment(name: str) -> ModuleType:
    """``experiments/<name>.py`` as a module, imported as when run as a script."""
    return load_benchmark(name, EXPERIMENTS)


RANKS = [
    "--data.train_subset=512",
    "--data.val_subset=300",
    "--data.batch_size=16",
    "--train.epochs=1",
    "--train.threads=1",
]


def tiny_config(out_dir: str | Path, *extra: str, run_name: str = "t") -> Config:
    """The tiny config writing to ``<out_dir>/<run_name>``; ``extra``: more overrides (later ones win)."""
    return load_config(None, [*TINY, f"--train.out_dir={out_dir}", f"--train.run_name={run_name}", *extra])


class RecordingTracker:
    """A tracker that keeps everything it is given (the Tracker interface)."""

    def __init__(self) -> None:
        self.params, self.metrics, self.artifacts, self.closed = {}, {}, [], False
        self.status, self.error = "", ""
        self.run_id, self.uri = "", ""

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, step, metrics):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_artifact(self, path):
        self.artifacts.append(str(path))

    def log_checkpoint(self, folder):
        self.artifacts.append(f"checkpoint:{folder}")

    def close(self, status="FINISHED", error=""):
        self.closed, self.status, self.error = True, status, error


@contextlib.contextmanager
def small_tmpfs(path: str | Path, size: str) -> Iterator[Path]:
    """A real full disk: a tmpfs of ``size`` (e.g. "3m") mounted at ``path`` for the block, unmounted after.

    Needs root (the test skips otherwise, or when this kernel refuses the mount)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
