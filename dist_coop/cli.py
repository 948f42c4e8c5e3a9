"""``dist-coop train|eval``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dist_coop.checkpoint import load_checkpoint, resolve_resume
from dist_coop.config import Config, config_from_dict, load_config
from dist_coop.data import build_data
from dist_coop.dist.env import DistInfo, single_process
from dist_coop.evaluate import results_table
from dist_coop.infer.cost import depth_costs
from dist_coop.track import build_tracker
from dist_coop.trainer import Trainer, prepare_run_dir


def run_training(cfg: Config, dist: DistInfo | None = None) -> dict[str, Any]:
    """Config -> data -> Trainer -> train -> results. The whole job of one process."""
    dist = dist or single_process(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = prepare_run_dir(cfg)
    data = build_data(cfg.data, seed=cfg.train.seed, device=dist.device)
    _check_data_matches_model(cfg, data)
    resume = resolve_resume(cfg.train.resume, run_dir)
    state = load_checkpoint(resume, dist.device) if resume else None
    tracker = build_tracker(
        cfg.tracking,
        run_name=cfg.train.run_name,
        out_dir=cfg.train.out_dir,
        run_id=state["mlflow_run_id"] if state else "",
        enabled=dist.is_main,
    )
    trainer = Trainer(cfg, data, run_dir=run_dir, dist=dist, tracker=tracker)
    if state is not None:
        trainer.load_state_dict(state)
        trainer.log(f"resumed from {resume} at step {trainer.step}")
    trainer.mlflow_run_id = getattr(tracker, "run_id", "")
    try:
        tracker.log_params(cfg.flat())
        metrics = trainer.train()
        results = trainer.finish(metrics)
    finally:
        tracker.close()
    if dist.is_main and getattr(tracker, "uri", ""):
        print(f"MLflow run {tracker.run_id} in {tracker.uri}  (view: mlflow ui --backend-store-uri {tracker.uri})")
    return results


def _check_data_matches_model(cfg: Config, data) -> None:
    if cfg.model.in_channels != data.in_channels or cfg.model.num_classes != data.num_classes:
        raise ValueError(
            f"model.in_channels/num_classes are {cfg.model.in_channels}/{cfg.model.num_classes} but "
            f"data.dataset {cfg.data.dataset!r} has {data.in_channels} channels and {data.num_classes} classes"
        )


def evaluate_checkpoint(path: str | Path, device: str = "auto") -> str:
    """Evaluate every net of a checkpoint at every depth on its config's validation data; returns the table."""
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    dist = single_process(device)
    data = build_data(cfg.data, seed=cfg.train.seed, device=dist.device)
    trainer = Trainer(cfg, data, run_dir=Path(path).parent, dist=dist)
    trainer.load_state_dict(state)
    metrics = trainer.evaluate()
    shape = tuple(data.val.split.images.shape[1:])
    costs = {spec.name: depth_costs(trainer.nets[spec.name], shape) for spec in trainer.task.specs}
    return results_table(trainer.task.specs, metrics, costs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-coop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the cooperative nets (overrides: --section.key=value)")
    p_train.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    p_eval = sub.add_parser("eval", help="evaluate a checkpoint at every depth")
    p_eval.add_argument("checkpoint")
    p_eval.add_argument("--device", default="auto")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            run_training(load_config(args.config, rest))
        else:
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            print(evaluate_checkpoint(args.checkpoint, args.device))
    except (ValueError, FileNotFoundError) as e:
        print(f"dist-coop: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
