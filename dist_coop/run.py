"""A run's folder, in one place: what training writes there and how inference reads it back.

```
<train.out_dir>/<train.run_name>/
  .lock                         held by the process writing the folder, naming it (host, pid)
  config.yaml                   the resolved config
  checkpoints/latest            the tag of the newest complete checkpoint (written last, atomically)
  checkpoints/step_00000040/    one checkpoint: trainer.pt (TrainerState) and each net's files: torch engine
                                <net>.pt (+ <net>.rank<k>.pt, replica k's BN statistics); DeepSpeed
                                <net>/step_00000040/ (DeepSpeed's own files) (+ <net>.rank<k>.pt)
  results.json, results.txt     the final per-depth metrics and costs (JSON, table)
  accuracy_vs_gflops.png
  profile_<net>.json            written by ``dist-coop profile``
```

``load_run(path)`` reads a run folder (its latest checkpoint) or a checkpoint folder back as plain
depth-adaptive nets, with the shape, normalisation and classes of their inputs, without building a
trainer, optimizers or datasets.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dist_coop.checkpoint import load_checkpoint, save_checkpoint
from dist_coop.config import Config, TrainConfig, check_device, config_from_dict, save_config
from dist_coop.coop.task import NetSpec, build_task
from dist_coop.distributed.env import ignore_deepspeed_deprecations
from dist_coop.durable import atomic_write_text, fsync_dir, fsync_tree
from dist_coop.models.adaptive import AdaptiveNet
from dist_coop.runlock import LOCK_FILE

CONFIG, CHECKPOINTS, LATEST, TRAINER_STATE = "config.yaml", "checkpoints", "latest", "trainer.pt"
LOCK = LOCK_FILE
PARTIAL, REPLACED = ".partial", ".replaced"  # under checkpoints/: a save being written, a re-save being swapped in
RESULTS_JSON, RESULTS_TXT, PLOT = "results.json", "results.txt", "accuracy_vs_gflops.png"


# ---------------------------------------------------------------- the folder


def run_dir(train: TrainConfig) -> Path:
    return Path(train.out_dir) / (train.run_name or "run")


def prepare_run_dir(cfg: Config, is_main: bool = True, resume: Path | None = None) -> Path:
    """The run's folder, made and given the resolved config by the main rank, after ``check_fresh_start``
    (with ``train.overwrite``: an earlier run's files moved aside first). The caller holds the folder's lock."""
    folder = run_dir(cfg.train)
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.train.overwrite:
            moved = move_aside(folder, keep=resume)
            if moved is not None:
                print(f"dist-coop: train.overwrite: the earlier run in {folder} was moved to {moved}", flush=True)
        recover_checkpoints(folder)
        check_fresh_start(folder, resume)
        save_config(cfg, folder / CONFIG)
    return folder


def checkpoints_of(folder: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run (``trainer.pt`` is written last), oldest first."""
    found = [p for p in (Path(folder) / CHECKPOINTS).glob("step_*") if p.is_dir() and is_checkpoint(p)]
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    try:
        return int(checkpoint.name.removeprefix("step_"))
    except ValueError:
        return -1


def check_fresh_start(folder: Path, resume: Path | None) -> None:
    """Refuse to write over another run's checkpoints: a fresh start in a folder that holds checkpoints, or a
    resume from a checkpoint older than ones the folder holds (its later saves would land on theirs)."""
    held = checkpoints_of(folder)
    latest = latest_checkpoint(folder)
    elsewhere = resume is not None and resume.resolve().parent != (folder / CHECKPOINTS).resolve()
    if (resume is None or elsewhere) and (held or latest is not None):
        newest = (latest or held[-1]).name
        raise ValueError(
            f"run folder {folder} holds the checkpoints of an earlier run (newest {newest}); continue it with "
            "--train.resume=auto, give this run another --train.run_name, or pass --train.overwrite=true to move "
            "the earlier run aside"
        )
    if resume is not None:
        later = [p.name for p in held if step_of(p) > step_of(resume)]
        if later:
            raise ValueError(
                f"resuming from {resume} (step {step_of(resume)}) in run folder {folder}, which holds later "
                f"checkpoints ({', '.join(later)}) that this run would write over; give this run another "
                "--train.run_name, or pass --train.overwrite=true to move the later ones aside"
            )


def move_aside(folder: Path, keep: Path | None = None) -> Path | None:
    """Move an earlier run's files out of ``folder`` into ``<folder>.replaced-<time>`` (None: nothing to move).
    ``keep``: a checkpoint inside ``folder`` to resume from; it and the checkpoints before it stay."""
    keep_step = (
        step_of(keep) if keep is not None and keep.resolve().parent == (folder / CHECKPOINTS).resolve() else None
    )
    entries = [p for p in folder.iterdir() if p.name != LOCK]
    if keep_step is not None:  # only the checkpoints after the one resumed from, and the pointer
        entries = [p for p in (folder / CHECKPOINTS).iterdir() if p.name == LATEST or step_of(p) > keep_step]
    if not entries:
        return None
    aside = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    for entry in entries:
        target = aside / entry.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        entry.rename(target)
    if keep_step is not None:
        atomic_write_text(folder / CHECKPOINTS / LATEST, keep.name)
    fsync_dir(folder)
    return aside


def checkpoint_dir(folder: str | Path, step: int) -> Path:
    """``<run>/checkpoints/step_00000040``: the tag is the step, the same on every rank."""
    return Path(folder) / CHECKPOINTS / f"step_{step:08d}"


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint folder belongs to."""
    return Path(checkpoint).parent.parent


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (its tag is written last, atomically); while a re-save of
    that step is being moved into place (or was stopped doing so), the copy it replaces."""
    marker = Path(folder) / CHECKPOINTS / LATEST
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    replaced = marker.parent / REPLACED / path.name
    return replaced if not path.is_dir() and replaced.is_dir() else path


def staging_dir(checkpoint: Path) -> Path:
    """Where a checkpoint is written before it is moved into place: ``checkpoints/.partial/step_N`` (the same
    folder name, so DeepSpeed's tag is the step). Nothing reads it; a save that fails leaves nothing else."""
    return checkpoint.parent / PARTIAL / checkpoint.name


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


def recover_checkpoints(folder: Path) -> None:
    """At a run's start (the folder locked): a checkpoint a crash left in ``.replaced`` goes back into place if
    nothing took its place; the staging area of saves that never finished is emptied."""
    checkpoints = folder / CHECKPOINTS
    for left in sorted((checkpoints / REPLACED).glob("step_*")):
        if not (checkpoints / left.name).exists():
            os.rename(left, checkpoints / left.name)
    for scratch in (REPLACED, PARTIAL):
        shutil.rmtree(checkpoints / scratch, ignore_errors=True)


def mark_latest(checkpoint: Path, keep: int) -> None:
    """Name ``checkpoint`` the run's latest, durably (every file below it flushed first, then the pointer written
    atomically), then delete the oldest complete checkpoints up to it so that ``keep`` remain, and the partial
    folders older than it (saves that failed). It is never deleted itself, nor is a checkpoint after it."""
    fsync_tree(checkpoint)
    marker = checkpoint.parent / LATEST
    atomic_write_text(marker, checkpoint.name)
    step = step_of(checkpoint)
    older = [p for p in checkpoints_of(checkpoint.parent.parent) if step_of(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in checkpoint.parent.glob("step_*"):
        if partial.is_dir() and not is_checkpoint(partial) and step_of(partial) < step:
            shutil.rmtree(partial, ignore_errors=True)


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / TRAINER_STATE).is_file()


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


# ---------------------------------------------------------------- the trainer's state


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
    inputs: Inputs | None = None  # None in checkpoints written before it was kept
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


# ---------------------------------------------------------------- results and profiles


def write_results(folder: Path, results: dict[str, Any], table: str) -> tuple[Path, Path]:
    """``results.json`` and ``results.txt`` (the table) of a finished run."""
    (folder / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    (folder / RESULTS_TXT).write_text(table + "\n")
    return folder / RESULTS_JSON, folder / RESULTS_TXT


def depth_accuracy(folder: Path, metric_prefix: str) -> dict[float, float]:
    """``{s: top-1 %}`` of ``<metric_prefix>@s`` from the run's ``results.json`` ({} before the run finished)."""
    path = folder / RESULTS_JSON
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())["metrics"]
    prefix = f"val/acc1/{metric_prefix}@"
    return {float(k[len(prefix) :]): v for k, v in metrics.items() if k.startswith(prefix)}


def profile_path(folder: Path, net: str) -> Path:
    return folder / f"profile_{net}.json"


# ---------------------------------------------------------------- devices


def require_device(name: str, field: str) -> torch.device:
    """The device ``field`` names, checked to be a valid name and present here (a ValueError says which not);
    ``auto`` is the first GPU when there is one, else the CPU."""
    check_device(name, field)
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not name.startswith("cuda"):
        return torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = "" if torch.version.cuda else f" (and torch {torch.__version__} is built without CUDA)"
        raise ValueError(f"{field} is {name!r} but no CUDA GPU is present on this machine{build}; use auto or cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= count:
        raise ValueError(f"{field} is {name!r} but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}")
    return torch.device(f"cuda:{index}")


# ---------------------------------------------------------------- reading a run back


def deepspeed_save_dir(checkpoint: Path, net: str) -> tuple[Path, str]:
    """DeepSpeed's (save folder, tag) of ``net`` in a checkpoint: ``<net>/<step tag>/``, or in checkpoints
    written before every rank shared the step as the tag, ``<checkpoint>/<net>/`` with the net as the tag."""
    save_dir, tag = checkpoint / net, checkpoint.name
    if not (save_dir / tag).is_dir():
        save_dir, tag = checkpoint, net
    return save_dir, tag


def net_state_dict(checkpoint: Path, net: str, engine: str) -> dict[str, Tensor]:
    """The weights and buffers of ``net`` as group rank 0 saved them (the torch engine's ``<net>.pt``, or
    DeepSpeed's module states; ZeRO-3's partitioned weights gathered by DeepSpeed's own reader)."""
    if engine == "torch" or (checkpoint / f"{net}.pt").is_file():  # a frozen net's weights: always this file
        return load_checkpoint(checkpoint / f"{net}.pt")["module"]
    save_dir, tag = deepspeed_save_dir(checkpoint, net)
    states = sorted((save_dir / tag).glob("*mp_rank_00_model_states.pt"))
    if not states:
        raise FileNotFoundError(f"DeepSpeed checkpoint not found: {save_dir / tag}")
    ignore_deepspeed_deprecations()
    from dist_coop.distributed.safe_load import (
        deepspeed_checkpoint_globals,
        deepspeed_loads_weights_only,
        load_weights_only,
    )

    module = load_weights_only(states[0], allowed=deepspeed_checkpoint_globals())["module"]
    if any(t.numel() == 0 for t in module.values()):  # ZeRO-3: each rank holds a partition of every weight
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # its progress report is not ours to print; its torch.load calls unpickle anything unless restricted
        with contextlib.redirect_stdout(io.StringIO()), deepspeed_loads_weights_only():
            module = {**module, **get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag)}
    return module


@dataclass(frozen=True)
class Run:
    """A run read back for inference: its nets in eval mode (any depth: ``with net.at_depth(s)``)."""

    folder: Path  # the run folder
    checkpoint: Path  # the checkpoint folder read
    config: Config
    step: int
    mlflow_run_id: str
    specs: tuple[NetSpec, ...]  # every net of the run (``nets`` holds those asked for)
    nets: dict[str, AdaptiveNet]
    inputs: Inputs
    device: torch.device


def load_run(path: str | Path, device: str | torch.device = "cpu", nets: Sequence[str] | None = None) -> Run:
    """The nets of a run folder's latest checkpoint (or of a checkpoint folder); ``nets``: only these.

    Nets are built from the config on the CPU and given the checkpoint's weights; the global RNG is left
    as it was. Checkpoints written before the inputs were kept in ``trainer.pt`` build the datasets once to
    learn them.
    """
    checkpoint = find_checkpoint(path)
    state = TrainerState.load(checkpoint)
    cfg = config_from_dict(state.config)
    specs = tuple(build_task(cfg.coop).specs)
    names = [s.name for s in specs]
    for name in nets or ():
        if name not in names:
            raise ValueError(f"net {name!r}: this checkpoint holds {sorted(names)}")
    device = torch.device(device)
    loaded = {}
    with torch.random.fork_rng(devices=[]):
        for spec in specs:
            if nets is None or spec.name in nets:
                net = spec.build(cfg.model, cfg.coop.scaling_factors)
                net.load_state_dict(net_state_dict(checkpoint, spec.name, cfg.dist.engine))
                loaded[spec.name] = net.to(device).eval()
    inputs = state.inputs
    if inputs is None:
        from dist_coop.data import build_data

        data = build_data(cfg.data, seed=cfg.train.seed)
        inputs = Inputs(data.input_shape, data.train.mean, data.train.std, data.classes)
    return Run(run_dir_of(checkpoint), checkpoint, cfg, state.step, state.mlflow_run_id, specs, loaded, inputs, device)
