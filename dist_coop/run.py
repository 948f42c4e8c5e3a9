"""A run's folder, in one place: what training writes there and how inference reads it back.

```
<train.out_dir>/<train.run_name>/
  .lock                         held by the process writing the folder, naming it (host, pid)
  config.yaml                   the resolved config
  checkpoints/                  the checkpoints and the tag of the latest (their layout: dist_coop/checkpoint.py)
  results.json, results.txt     the final per-depth metrics and costs (JSON, table)
  accuracy_vs_gflops.png
  profile_<net>.json            written by ``dist-coop profile``
```

``load_run(path)`` reads a run folder (its latest checkpoint) or a checkpoint folder back as plain
depth-adaptive nets, with the shape, normalisation and classes of their inputs, without building a
trainer, optimizers or datasets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_coop.checkpoint import (
    CHECKPOINTS,
    LATEST,
    Inputs,
    TrainerState,
    checkpoints_of,
    find_checkpoint,
    latest_checkpoint,
    name_latest,
    net_state_dict,
    recover_checkpoints,
    run_dir_of,
    step_of,
)
from dist_coop.config import Config, TrainConfig, config_from_dict, save_config
from dist_coop.coop.task import NetSpec, build_task
from dist_coop.durable import fsync_dir
from dist_coop.models.adaptive import AdaptiveNet
from dist_coop.runlock import LOCK_FILE

CONFIG, LOCK = "config.yaml", LOCK_FILE
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
        name_latest(folder / CHECKPOINTS / keep.name)
    fsync_dir(folder)
    return aside


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


# ---------------------------------------------------------------- reading a run back


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
    as it was. A checkpoint whose ``trainer.pt`` does not keep the inputs has the datasets built once to learn
    them.
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
