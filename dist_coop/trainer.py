"""The training loop, readable top to bottom.

``Trainer`` owns the nets, their optimizers and schedules, and the position in the data. One
step: the task returns named loss terms, the loop sums them, backpropagates once, clips and
steps each net's optimizer, and logs. Loss terms and ablations live in the task, not here.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dist_coop.checkpoint import LATEST, load_checkpoint, save_checkpoint
from dist_coop.config import Config, save_config
from dist_coop.coop.task import build_task, net_of
from dist_coop.data import Data
from dist_coop.data.memory import MemoryBatches
from dist_coop.dist.env import DistInfo
from dist_coop.evaluate import evaluate_all, results_table
from dist_coop.infer.cost import depth_costs
from dist_coop.models.adaptive import AdaptiveNet, recalibrate_bn
from dist_coop.models.registry import build_from_config
from dist_coop.optim import build_optimizer, build_scheduler
from dist_coop.track import NullTracker, Tracker
from dist_coop.track.plots import plot_accuracy_vs_flops


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``optim.amp`` on ``device`` (None: full fp32)."""
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("optim.amp: fp16 needs a CUDA device; use bf16 or none on CPU")
        return torch.float16
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16


def build_nets(cfg: Config, specs, device: torch.device) -> dict[str, AdaptiveNet]:
    """Every net of the task, each from its own seed (Teammates must start different)."""
    nets = {}
    for i, spec in enumerate(specs):
        torch.manual_seed(cfg.train.seed * 1000 + i)
        nets[spec.name] = build_from_config(cfg.model, cfg.coop.scaling_factors, leader=spec.leader).to(device)
    return nets


DEFAULT_CALIBRATION_SAMPLES = 2000  # for depths no loss term trains, when train.recalibrate_bn is 0


class Trainer:
    def __init__(
        self,
        cfg: Config,
        data: Data,
        *,
        run_dir: str | Path,
        dist: DistInfo | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self.cfg, self.data = cfg, data
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.run_dir = Path(run_dir)
        self.tracker = tracker or NullTracker()
        self.task = build_task(cfg.coop, label_smoothing=cfg.optim.label_smoothing)
        self.nets = build_nets(cfg, self.task.specs, self.device)
        self.steps_per_epoch = len(data.train)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.optims = {n: build_optimizer(net, cfg.optim) for n, net in self.nets.items()}
        self.scheds = {n: build_scheduler(opt, self.total_steps, cfg.optim) for n, opt in self.optims.items()}
        self.amp_dtype = resolve_amp(cfg.optim.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0  # optimizer steps done
        self.mlflow_run_id = ""

    # ------------------------------------------------------------------ one step

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One optimizer step of every net on the batch; returns the loss terms and per-net totals."""
        for net in self.nets.values():
            net.train()
        for opt in self.optims.values():
            opt.zero_grad(set_to_none=True)
        with self.autocast():
            terms = self.task(self.nets, x, y)
        totals: dict[str, torch.Tensor] = {}
        for name, value in terms.items():
            totals[net_of(name)] = totals.get(net_of(name), 0.0) + value
        # each net's total touches only its own parameters, so one backward of the sum is
        # the same as one backward per net
        self.scaler.scale(sum(totals.values())).backward()
        for name, opt in self.optims.items():
            if self.cfg.optim.grad_clip > 0:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.nets[name].parameters(), self.cfg.optim.grad_clip)
            self.scaler.step(opt)
            self.scheds[name].step()
        self.scaler.update()
        self.step += 1
        out = {f"train/{k}": v.item() for k, v in terms.items()}
        out.update({f"train/loss/{k}": v.item() for k, v in totals.items()})
        return out

    # ------------------------------------------------------------------ the loop

    def train(self, stop_at_step: int | None = None) -> dict[str, float]:
        """Train to ``total_steps`` (or stop early at ``stop_at_step``, as a crash would); returns final metrics."""
        cfg = self.cfg.train
        show = cfg.progress and self.dist.is_main
        metrics: dict[str, float] = {}
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            steps_left = min(self.steps_per_epoch - start, self.total_steps - self.step)
            bar = tqdm(total=steps_left, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
            tick, seen = time.perf_counter(), 0
            for x, y in self.data.train.epoch(epoch, start):
                logs = self.train_step(x, y)
                seen += len(y)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    logs["train/samples_per_s"] = seen / (time.perf_counter() - tick)
                    logs["train/lr"] = next(iter(self.scheds.values())).get_last_lr()[0]
                    self.tracker.log_metrics(self.step, logs)
                    bar.set_postfix(loss=f"{sum(v for k, v in logs.items() if k.startswith('train/loss/')):.3f}")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                if self.step == stop_at_step:
                    bar.close()
                    return metrics
                if self.step >= self.total_steps:
                    break
            bar.close()
            epoch_done = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            if epoch_done and ((epoch + 1) % cfg.eval_every == 0 or self.step == self.total_steps):
                metrics = self.evaluate("trained")
                self.tracker.log_metrics(self.step, metrics)
                self.log(f"epoch {epoch + 1}: " + self.summary(metrics))
            self.save()
        return metrics

    def evaluate(self, which: str = "all") -> dict[str, float]:
        return evaluate_all(self.nets, self.task.specs, lambda: self.data.val.epoch(0), self.autocast, which=which)

    def summary(self, metrics: dict[str, float]) -> str:
        return ", ".join(
            f"{spec.metric(s)} {metrics[key]:.2f}%"
            for spec in self.task.specs
            for s in spec.eval_depths
            if (key := f"val/acc1/{spec.metric(s)}") in metrics
        )

    def log(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    # ------------------------------------------------------------------ after training

    def recalibrate(self, num_samples: int, untrained_only: bool = False) -> None:
        """Recompute depths' BN statistics on ``num_samples`` un-augmented training samples.

        All depths, or (``untrained_only``) just those no loss term trains, whose statistics
        were never updated: a truncated net needs them to be evaluated fairly.
        """
        train = self.data.train
        calib = MemoryBatches(
            train.split.take(num_samples),
            batch_size=train.batch_size,
            mean=train.mean,
            std=train.std,
            train=False,
            device=self.device,
        )
        for spec in self.task.specs:
            for s in spec.eval_depths:
                if not (untrained_only and s in spec.trained_depths):
                    recalibrate_bn(self.nets[spec.name], (x for x, _ in calib.epoch(0)), s)

    def finish(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Costs per depth, the results table, plot and artifacts; returns the final results."""
        samples = self.cfg.train.recalibrate_bn
        self.recalibrate(samples or DEFAULT_CALIBRATION_SAMPLES, untrained_only=not samples)
        if samples or not metrics:  # every depth changed (or none was evaluated yet)
            metrics = self.evaluate()
        else:  # the last epoch's evaluation holds for the trained depths
            metrics = {**metrics, **self.evaluate("untrained")}
        self.save()  # the checkpoint holds the recalibrated statistics too
        shape = tuple(self.data.val.split.images.shape[1:])
        costs = {spec.name: depth_costs(self.nets[spec.name], shape) for spec in self.task.specs}
        cost_metrics = {}
        for spec in self.task.specs:
            for s in spec.eval_depths:
                cost_metrics[f"cost/gflops/{spec.metric(s)}"] = costs[spec.name][s].gflops
                cost_metrics[f"cost/params/{spec.metric(s)}"] = float(costs[spec.name][s].params)
        self.tracker.log_metrics(self.step, {**metrics, **cost_metrics})
        table = results_table(self.task.specs, metrics, costs)
        self.log("\n" + table)
        results = {"step": self.step, "metrics": metrics, "costs": cost_metrics}
        if self.dist.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
            (self.run_dir / "results.txt").write_text(table + "\n")
            curves: dict[str, dict[float, tuple[float, float]]] = {}
            for spec in self.task.specs:
                for s in spec.eval_depths:
                    curves.setdefault(spec.role or spec.name, {})[s] = (
                        costs[spec.name][s].gflops,
                        metrics[f"val/acc1/{spec.metric(s)}"],
                    )
            plot = plot_accuracy_vs_flops(curves, self.run_dir / "accuracy_vs_gflops.png", self.cfg.train.run_name)
            for path in (
                self.run_dir / "config.yaml",
                self.run_dir / "results.txt",
                self.run_dir / "results.json",
                plot,
                self.run_dir / LATEST,
            ):
                if path.exists():
                    self.tracker.log_artifact(path)
        return results

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {n: net.state_dict() for n, net in self.nets.items()},
            "optims": {n: opt.state_dict() for n, opt in self.optims.items()},
            "scheds": {n: s.state_dict() for n, s in self.scheds.items()},
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": {"torch": torch.get_rng_state()},  # data order and augmentation are seeded by (seed, epoch, step)
            "config": self.cfg.to_dict(),
            "mlflow_run_id": self.mlflow_run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["nets"]) != set(self.nets):
            raise ValueError(f"checkpoint holds nets {sorted(state['nets'])}, this config trains {sorted(self.nets)}")
        for n, net in self.nets.items():
            net.load_state_dict(state["nets"][n])
            self.optims[n].load_state_dict(state["optims"][n])
            self.scheds[n].load_state_dict(state["scheds"][n])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        self.mlflow_run_id = state.get("mlflow_run_id", "")

    def save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), self.run_dir / LATEST)

    def resume(self, path: str | Path) -> None:
        self.load_state_dict(load_checkpoint(path, self.device))
        self.log(f"resumed from {path} at step {self.step}")


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or "run")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir
