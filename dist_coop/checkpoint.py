"""A run's checkpoints, in one place: the folder layout, how a checkpoint is written and published, how one is
found and read back.

```
<run folder>/checkpoints/
  latest                        the tag of the newest complete checkpoint (written last, atomically)
  step_00000040/                one checkpoint; its tag is the step, the same on every rank:
    trainer.pt                  TrainerState (written last: a folder without it is not a checkpoint)
    <net>.pt                    torch engine (and a frozen net): the net's state, written by group rank 0
    <net>.rank<k>.pt            replica k's BN statistics (both engines)
    <net>/step_00000040/        DeepSpeed's own files (save folder ``<net>``, tag the step)
  .partial/step_00000040/       a save being written; moved into place whole (``publish_checkpoint``)
  .replaced/step_00000040/      a checkpoint of the same step while a re-save takes its place
```

Every file is one dict of tensors and plain Python values (state dicts, optimizer / scheduler states, the trainer
position, RNG states, the resolved config), loaded with ``torch.load(weights_only=True)``. It is written to a
temporary file in the same folder and renamed over the target, so a crash mid-write never leaves a half-written
file; the file and the folder are flushed to disk before it counts as written.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dist_coop.distributed.env import ignore_deepspeed_deprecations
from dist_coop.distributed.safe_load import (
    deepspeed_checkpoint_globals,
    deepspeed_loads_weights_only,
    load_weights_only,
)
from dist_coop.durable import atomic_write_text, fsync_dir, fsync_tree

CHECKPOINTS, LATEST, TRAINER_STATE = "checkpoints", "latest", "trainer.pt"
PARTIAL, REPLACED = ".partial", ".replaced"  # under checkpoints/: a save being written, a re-save being swapped in


# ---------------------------------------------------------------- one file, atomically


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


# ---------------------------------------------------------------- names


def checkpoint_dir(folder: str | Path, step: int) -> Path:
    """``<run>/checkpoints/step_00000040``: the tag is the step, the same on every rank."""
    return Path(folder) / CHECKPOINTS / f"step_{step:08d}"


def step_of(checkpoint: Path) -> int:
    try:
        return int(checkpoint.name.removeprefix("step_"))
    except ValueError:
        return -1


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint folder belongs to."""
    return Path(checkpoint).parent.parent


def net_file(checkpoint: Path, net: str) -> Path:
    """``<net>.pt``: the torch engine's (and a frozen net's) state of ``net``, written by group rank 0."""
    return checkpoint / f"{net}.pt"


def replica_file(checkpoint: Path, net: str, group_rank: int) -> Path:
    """``<net>.rank<k>.pt``: the BN statistics of replica ``group_rank`` > 0 of ``net`` (both engines)."""
    return checkpoint / f"{net}.rank{group_rank}.pt"


def deepspeed_save_target(checkpoint: Path, net: str) -> tuple[Path, str]:
    """DeepSpeed's (save folder, tag) for saving ``net``: ``<net>/<step tag>/``.

    DeepSpeed's tag must be the same on every rank: its save compares it over all ranks of the job, not the net's
    group. In the split placement each rank saves a different net at the same moment, so the net names the save
    folder and the tag is the step, which every rank shares.
    """
    return checkpoint / net, checkpoint.name


def deepspeed_save_dir(checkpoint: Path, net: str) -> tuple[Path, str]:
    """DeepSpeed's (save folder, tag) of ``net`` in a checkpoint: ``<net>/<step tag>/``, or ``<checkpoint>/<net>/``
    in a checkpoint whose DeepSpeed files were saved with the net's name as the tag."""
    save_dir, tag = deepspeed_save_target(checkpoint, net)
    if not (save_dir / tag).is_dir():
        save_dir, tag = checkpoint, net
    return save_dir, tag


# ---------------------------------------------------------------- finding checkpoints


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / TRAINER_STATE).is_file()


def checkpoints_of(folder: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run (``trainer.pt`` is written last), oldest first."""
    found = [p for p in (Path(folder) / CHECKPOINTS).glob("step_*") if p.is_dir() and is_checkpoint(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (its tag is written last, atomically); while a re-save of
    that step is being moved into place (or was stopped doing so), the copy it replaces."""
    marker = Path(folder) / CHECKPOINTS / LATEST
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    replaced = marker.parent / REPLACED / path.name
    return replaced if not path.is_dir() and replaced.is_dir() else path


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a checkpoint folder, else the latest checkpoint of the run folder ``path``."""
    folder = Path(path)
    if is_checkpoint(folder):
        return folder
    latest = latest_checkpoint(folder)
    if latest is None:
        raise FileNotFoundError(f"{folder} is neither a checkpoint folder nor a run directory with checkpoints")
    return latest


def resolve_resume(resume: str, folder: Path) -> Path | None:
    """``train.resume``: ``""`` -> None; ``"auto"`` -> the run's latest checkpoint if any; else a checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(folder)
    path = Path(resume)
    if not is_checkpoint(path):
        raise ValueError(f"train.resume: {path} is not a checkpoint folder (no {TRAINER_STATE})")
    return path


# ---------------------------------------------------------------- writing: stage, publish, keep, recover


def staging_dir(checkpoint: Path) -> Path:
    """Where a checkpoint is written before it is moved into place: ``checkpoints/.partial/step_N`` (the same
    folder name, so DeepSpeed's tag is the step). Nothing reads it; a save that fails leaves nothing else."""
    return checkpoint.parent / PARTIAL / checkpoint.name


def discard_staged(staged: Path) -> None:
    """Remove a staged checkpoint that is not to be published (a save that failed, now or at an earlier attempt
    of the same step), and the staging area when no other save is in it."""
    shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


def publish_checkpoint(staged: Path, checkpoint: Path, keep: int) -> None:
    """Move a fully written checkpoint into place and name it the latest (``mark_latest``). A checkpoint of the
    same step already there (the report's save after the last step's) is moved to ``.replaced`` first and deleted
    last: at every instant ``latest`` names a complete checkpoint (``latest_checkpoint`` reads ``.replaced`` in
    between, and ``recover_checkpoints`` puts it back after a crash there)."""
    replaced = checkpoint.parent / REPLACED / checkpoint.name
    if checkpoint.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        replaced.parent.mkdir(exist_ok=True)
        os.rename(checkpoint, replaced)
    os.rename(staged, checkpoint)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # the staging area, when no other save is in it
    fsync_dir(checkpoint.parent)
    try:
        mark_latest(checkpoint, keep)
    except BaseException:
        if latest_checkpoint(run_dir_of(checkpoint)) != checkpoint:  # not named: no later run may meet it
            shutil.rmtree(checkpoint, ignore_errors=True)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def name_latest(checkpoint: Path) -> None:
    """Write the tag of ``checkpoint`` into ``checkpoints/latest``, atomically."""
    atomic_write_text(checkpoint.parent / LATEST, checkpoint.name)


def mark_latest(checkpoint: Path, keep: int) -> None:
    """Name ``checkpoint`` the run's latest, durably (every file below it flushed first, then the pointer written
    atomically), then delete the oldest complete checkpoints up to it so that ``keep`` remain, and the partial
    folders older than it (saves that failed). It is never deleted itself, nor is a checkpoint after it."""
    fsync_tree(checkpoint)
    name_latest(checkpoint)
    step = step_of(checkpoint)
    older = [p for p in checkpoints_of(checkpoint.parent.parent) if step_of(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in checkpoint.parent.glob("step_*"):
        if partial.is_dir() and not is_checkpoint(partial) and step_of(partial) < step:
            shutil.rmtree(partial, ignore_errors=True)


def recover_checkpoints(folder: Path) -> None:
    """At a run's start (the folder locked): a checkpoint a crash left in ``.replaced`` goes back into place if
    nothing took its place; the staging area of saves that never finished is emptied."""
    checkpoints = folder / CHECKPOINTS
    for left in sorted((checkpoints / REPLACED).glob("step_*")):
        if not (checkpoints / left.name).exists():
            os.rename(left, checkpoints / left.name)
    for scratch in (REPLACED, PARTIAL):
        shutil.rmtree(checkpoints / scratch, ignore_errors=True)


# ---------------------------------------------------------------- trainer.pt


@dataclass(frozen=True)
class Inputs:
    """What the nets' inputs look like: one image's (C, H, W), the normalisation, the class names."""

    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def to_dict(self) -> dict[str, list]:
        return {
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": list(self.classes),
        }

    @staticmethod
    def from_dict(raw: dict[str, Sequence]) -> Inputs:
        return Inputs(tuple(raw["shape"]), tuple(raw["mean"]), tuple(raw["std"]), tuple(raw["classes"]))


@dataclass(frozen=True)
class TrainerState:
    """``trainer.pt`` of a checkpoint: the position of the run and what is needed to read it back alone."""

    step: int
    config: dict[str, dict[str, Any]]  # Config.to_dict()
    mlflow_run_id: str = ""  # the tracker's run, continued on resume
    rng: Tensor | None = None  # torch.get_rng_state()
    guard: dict[str, Any] = field(default_factory=dict)  # StepGuard.state_dict()
    inputs: Inputs | None = None  # None: a checkpoint that does not keep them (load_run builds the datasets)
    # the run's virtual data shards: its exchange groups when it first started, kept over resumes on other world
    # sizes (each exchange group then reads several; dist_coop/data/batches.py). 0: not kept (the current count)
    data_shards: int = 0
    # the launch that saved it: {"world_size", "placement", "micro_batch"} ({}: not kept)
    layout: dict[str, Any] = field(default_factory=dict)

    def save(self, checkpoint: Path) -> Path:
        names = ("step", "config", "mlflow_run_id", "rng", "guard", "data_shards", "layout")
        state = {name: getattr(self, name) for name in names}
        if self.inputs is not None:
            state["inputs"] = self.inputs.to_dict()
        return save_checkpoint(state, checkpoint / TRAINER_STATE)

    @staticmethod
    def load(checkpoint: str | Path) -> TrainerState:
        state = load_checkpoint(Path(checkpoint) / TRAINER_STATE)
        return TrainerState(
            step=int(state["step"]),
            config=state["config"],
            mlflow_run_id=state.get("mlflow_run_id", ""),
            rng=state.get("rng"),
            guard=state.get("guard", {}),
            inputs=Inputs.from_dict(state["inputs"]) if "inputs" in state else None,
            data_shards=int(state.get("data_shards", 0)),
            layout=state.get("layout", {}),
        )


# ---------------------------------------------------------------- a net's weights, without its engine


def net_state_dict(checkpoint: Path, net: str, engine: str) -> dict[str, Tensor]:
    """The weights and buffers of ``net`` as group rank 0 saved them (the torch engine's ``<net>.pt``, or
    DeepSpeed's module states; ZeRO-3's partitioned weights gathered by DeepSpeed's own reader)."""
    if engine == "torch" or net_file(checkpoint, net).is_file():  # a frozen net's weights: always this file
        return load_checkpoint(net_file(checkpoint, net))["module"]
    save_dir, tag = deepspeed_save_dir(checkpoint, net)
    states = sorted((save_dir / tag).glob("*mp_rank_00_model_states.pt"))
    if not states:
        raise FileNotFoundError(f"DeepSpeed checkpoint not found: {save_dir / tag}")
    ignore_deepspeed_deprecations()
    module = load_weights_only(states[0], allowed=deepspeed_checkpoint_globals())["module"]
    if any(t.numel() == 0 for t in module.values()):  # ZeRO-3: each rank holds a partition of every weight
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # its progress report is not ours to print; its torch.load calls unpickle anything unless restricted
        with contextlib.redirect_stdout(io.StringIO()), deepspeed_loads_weights_only():
            module = {**module, **get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag)}
    return module
