"""After training: the report step. BN statistics for the depths no loss term trained, the final evaluation, a
checkpoint holding both, each depth's cost and the throughput; then, on rank 0, the table, ``results.json`` /
``results.txt``, the accuracy-vs-GFLOPs plot and the artifacts, and the final metrics logged once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dist_coop.checkpoint import latest_checkpoint
from dist_coop.config import ModelConfig
from dist_coop.coop.task import NetSpec
from dist_coop.distributed.comm import gather_to_main
from dist_coop.evaluate import results_table
from dist_coop.infer.cost import cost_metrics
from dist_coop.run import CONFIG, PLOT, write_results
from dist_coop.track.plots import plot_accuracy_vs_flops
from dist_coop.trainer import Trainer

DEFAULT_CALIBRATION_SAMPLES = 2000  # for depths no loss term trains, when train.recalibrate_bn is 0


def final_metrics(trainer: Trainer, metrics: dict[str, float]) -> dict[str, float]:
    """Recalibrate BN statistics (every depth with ``train.recalibrate_bn``, else the untrained ones) and
    evaluate what changed; ``metrics``: the training loop's last evaluation. Collective: decided the same way
    on every rank; the metrics live on rank 0 only."""
    samples = trainer.cfg.train.recalibrate_bn
    trainer.recalibrate(samples or DEFAULT_CALIBRATION_SAMPLES, untrained_only=not samples)
    if samples or trainer.evaluated_at != trainer.step:  # every depth changed, or this step was not evaluated
        return trainer.evaluate()
    return {**metrics, **trainer.evaluate("untrained")}  # the last epoch's evaluation holds for the trained depths


def costs_of(model: ModelConfig, scaling_factors: Sequence[float], spec: NetSpec, input_shape) -> dict[str, float]:
    """``cost/{gflops,params,blocks}/<net>@<s>``, measured on a fresh CPU copy of the net's architecture:
    weights change neither FLOPs nor parameter counts, and the trained module may sit on a GPU or be
    partitioned by ZeRO-3. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        net = spec.build(model, scaling_factors)
    return cost_metrics(spec.metric, net, input_shape)


def finish(trainer: Trainer, metrics: dict[str, float]) -> dict[str, Any]:
    """The report of a trained run (every rank calls it); returns the results (metrics and costs on rank 0)."""
    metrics = final_metrics(trainer, metrics)
    if trainer.cfg.train.eval_train:  # how well each depth fits its training samples, beside val
        metrics = {**metrics, **trainer.evaluate(split="train")}
    trainer.save()  # the checkpoint holds the recalibrated statistics too
    cfg = trainer.cfg
    local: dict[str, float] = {}
    for spec in trainer.local_specs:
        local.update(costs_of(cfg.model, cfg.coop.scaling_factors, spec, trainer.data.input_shape))
    rate = trainer.meter.rate()
    costs = gather_to_main(trainer.dist, {**local, f"throughput/samples_per_s/rank{trainer.dist.rank}": rate})
    results = {
        "step": trainer.step,
        "metrics": metrics,
        "costs": costs,
        "placement": trainer.placement.kind,
        "train_seconds": trainer.meter.seconds,
    }
    if not trainer.dist.is_main:
        return results
    trainer.log(
        f"training throughput: {rate:.0f} samples/s on rank 0 ({trainer.placement.kind}, "
        f"{trainer.dist.world_size} process(es))"
    )
    trainer.tracker.log_metrics(trainer.step, {**metrics, **costs})
    table = results_table(trainer.task.specs, metrics, costs)
    if cfg.train.eval_train:
        table += "\n\n" + results_table(trainer.task.specs, metrics, costs, split="train")
    trainer.log("\n" + table)
    results_json, results_txt = write_results(trainer.run_dir, results, table)
    curves: dict[str, dict[float, tuple[float, float]]] = {}
    for spec in trainer.task.specs:
        for s in spec.eval_depths:
            m = spec.metric(s)
            curves.setdefault(spec.role or spec.name, {})[s] = (costs[f"cost/gflops/{m}"], metrics[f"val/acc1/{m}"])
    plot = plot_accuracy_vs_flops(curves, trainer.run_dir / PLOT, cfg.train.run_name)
    for path in (trainer.run_dir / CONFIG, results_txt, results_json, plot):
        trainer.tracker.log_artifact(path)
    trainer.tracker.log_checkpoint(latest_checkpoint(trainer.run_dir))  # as tracking.log_checkpoint says
    return results
