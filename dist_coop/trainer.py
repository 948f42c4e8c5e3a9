"""The training loop, readable top to bottom.

``Trainer`` owns the engines of the nets placed on this rank and the position in the data. One
step: the task returns named loss terms (exchanging soft targets with the other nets of the
exchange group when they live on other ranks), each engine backpropagates its net's sum and
steps, and the loop logs. Loss terms and ablations live in the task; placement in ``distributed/``; the
checkpoint folder's layout in ``checkpoint.py``; what happens after the last step (recalibration, final
evaluation, costs, results) in ``report.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from dist_coop.checkpoint import (
    CHECKPOINTS,
    Inputs,
    TrainerState,
    checkpoint_dir,
    discard_staged,
    latest_checkpoint,
    publish_checkpoint,
    staging_dir,
)
from dist_coop.config import Config
from dist_coop.coop.task import NetSpec, build_task, net_of
from dist_coop.data import Data
from dist_coop.data.batches import virtual_shards
from dist_coop.distributed.comm import (
    LogitExchange,
    all_reduce_sum,
    all_reduce_world,
    average_buffers,
    barrier,
    build_groups,
    gather_to_main,
)
from dist_coop.distributed.engine import DeepSpeedEngine, TorchEngine, clip_threshold
from dist_coop.distributed.env import DistInfo
from dist_coop.distributed.frozen import FrozenEngine
from dist_coop.distributed.placement import check_engine_support, plan_placement
from dist_coop.distributed.resize import check_data_shards, launch_params, layout_of, resume_line
from dist_coop.durable import DiskFullError, disk_full_line, fsync_tree, is_disk_full
from dist_coop.evaluate import METRIC_PREFIX, evaluate_sums, selected_depths, split_batches, sums_to_metrics
from dist_coop.guard import NonFiniteError, StepGuard, nonfinite_nets
from dist_coop.models.adaptive import gate_stats, recalibrate_bn
from dist_coop.precision import AUTOCAST_DTYPES, resolve_precision
from dist_coop.preempt import Preempted
from dist_coop.pretrained import load_init
from dist_coop.protocols import Engine
from dist_coop.track import NullTracker, Tracker


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``optim.amp`` on ``device`` (None: full fp32): ``resolve_precision``'s decision."""
    return AUTOCAST_DTYPES[resolve_precision(amp, device)]


def in_layout(x: Tensor, channels_last: bool) -> Tensor:
    """``x`` with the canonical strides of the chosen memory format (a copy only when they differ).

    ``contiguous()`` is not enough: a (B, 1, H, W) batch counts as contiguous in both formats whatever its
    channel stride, and a batch with channels_last strides (any data source may give one) makes oneDNN run the
    whole net channels_last without being asked (see ``check_cpu_layout``)."""
    fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    canonical = torch.empty(x.shape, device="meta", memory_format=fmt).stride()
    return x if x.stride() == canonical else x.clone(memory_format=fmt)


def check_cpu_layout(net: torch.nn.Module, device: torch.device) -> None:
    """Refuse ``train.channels_last`` where oneDNN's backward hangs or crashes the process: on a CPU without
    AVX-512, a 1x1 strided convolution of fewer than 8 input channels in channels_last (torch 2.13, oneDNN
    3.12; a narrow net's downsampling shortcut: ``model.width`` 4 and below). Seen deterministically on the
    third backward of such a convolution; the plain layout takes another kernel and is not affected."""
    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 8:
            raise ValueError(
                f"train.channels_last on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX-512): oneDNN's "
                f"backward of the 1x1 strided convolution {name} ({m.in_channels} input channels) hangs or crashes; "
                "use model.width >= 8, or train.channels_last: false (it is a GPU option)"
            )


class Throughput:
    """Samples per second: of the training steps alone, over the launch (``rate``: the run's throughput), and
    of everything since the epoch began (``epoch_rate``: data loading, logging, checkpoints included)."""

    def __init__(self) -> None:
        self.seconds, self.samples = 0.0, 0
        self.start_epoch()

    def start_epoch(self) -> None:
        self._tick, self._seen = time.perf_counter(), 0

    @contextlib.contextmanager
    def step(self, num_samples: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start
        self.samples += num_samples
        self._seen += num_samples

    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    def epoch_rate(self) -> float:
        return self._seen / (time.perf_counter() - self._tick)


def _whole(params) -> contextlib.AbstractContextManager:
    """Parameters readable whole: ZeRO-3 keeps one partition per rank (a gather over the net's group, which
    every rank of it calls at the same point); a no-op for parameters that are not partitioned."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        data: Data,
        *,
        run_dir: str | Path,
        dist: DistInfo | None = None,
        tracker: Tracker | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
        data_shards: int | None = None,
    ) -> None:
        """``stop_requested``: has this process been asked to stop (SIGTERM)? Read once per step.

        ``data_shards``: the run's virtual data shards, from the checkpoint it resumes (``TrainerState.data_shards``);
        None or 0 for a fresh run (or a checkpoint that did not keep them): this launch's exchange groups. Each
        exchange group reads an equal share of them, one batch of each per step (``virtual_shards``).
        """
        self.cfg, self.dist = cfg, dist or DistInfo()
        self.device = self.dist.device
        self.run_dir = Path(run_dir)
        self.tracker = tracker or NullTracker()
        self.task = build_task(cfg.coop, label_smoothing=cfg.optim.label_smoothing)
        self.placement = plan_placement(cfg.dist.placement, self.dist.world_size, [s.name for s in self.task.specs])
        check_engine_support(self.placement, cfg.dist.engine, cfg.dist.zero_stage)
        frozen = cfg.coop.leader and cfg.coop.leader_mode == "frozen"
        if frozen and cfg.dist.engine == "deepspeed" and self.placement.kind == "split":  # refused on every rank
            raise ValueError(  # DeepSpeed's checkpoint save is collective over every rank, the frozen net's too
                "coop.leader_mode: frozen with dist.engine: deepspeed needs dist.placement: colocated "
                "(or dist.engine: torch)"
            )
        self.groups = build_groups(self.placement, self.dist)
        self.exchange = LogitExchange(self.placement, self.groups, self.dist)
        self.part_backward = cfg.part_backward()  # train.backward: each net's loss in parts, or summed
        self.local_specs = [s for s in self.task.specs if s.name in self.placement.nets_of(self.dist.rank)]
        shard = self.placement.exchange_index(self.dist.rank)
        self.data_shards = data_shards or self.placement.num_shards
        check_data_shards(self.data_shards, self.placement, cfg.dist.placement)
        self.train_data = virtual_shards(data.train, shard, self.placement.num_shards, self.data_shards)
        self.layout = layout_of(self.placement, self.train_data.batch_size)  # kept in checkpoints
        self.data = data
        # one decision for both engines (dist_coop/precision.py): the torch engine's autocast, DeepSpeed's bf16 / fp16
        self.precision = resolve_precision(cfg.optim.amp, self.device)
        self.inputs = Inputs(data.input_shape, data.train.mean, data.train.std, data.classes)  # kept in checkpoints
        self.steps_per_epoch = len(self.train_data)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.engines: dict[str, Engine] = {
            spec.name: self._engine(i, spec) for i, spec in enumerate(self.task.specs) if spec in self.local_specs
        }
        engine_amp = cfg.dist.engine == "deepspeed"  # DeepSpeed casts the model itself
        self.amp_dtype = None if engine_amp else AUTOCAST_DTYPES[self.precision]
        self.guard = StepGuard(
            [s.name for s in self.task.specs],
            self.nets,
            mode=cfg.train.on_nonfinite,
            max_consecutive=cfg.train.max_nonfinite,
            dist=self.dist,
            stop_requested=stop_requested,
        )
        self.step = 0  # optimizer steps done
        self.meter = Throughput()  # this process, this launch
        self.bar: tqdm | None = None  # the epoch's progress bar, while training
        self.evaluated_at = -1  # step of the last evaluation of the trained depths (same on every rank)

    def _engine(self, index: int, spec: NetSpec) -> Engine:
        torch.manual_seed(self.cfg.train.seed * 1000 + index)  # same init whatever the placement
        net = spec.build(self.cfg.model, self.cfg.coop.scaling_factors)
        model = self.cfg.model
        init = (model.init_leader or model.init) if spec.leader else model.init
        frozen = spec.leader and self.cfg.coop.leader_mode == "frozen"
        if frozen and not init:
            raise ValueError(
                "coop.leader_mode: frozen needs a trained Leader: set model.init_leader (or model.init) to a run, "
                "a state dict file or torchvision weights"
            )
        if init:  # every rank of the net's group reads the same source: the same weights
            load_init(net, init, spec.name if spec.leader else "teammate_a", log=self.log)
        net = net.to(self.device)
        if self.cfg.train.channels_last:
            check_cpu_layout(net, self.device)
            net = net.to(memory_format=torch.channels_last)
        if self.cfg.train.compile != "none":
            net.compile_blocks(self.cfg.train.compile)
        group = self.groups.net.get(spec.name)
        if frozen:
            return FrozenEngine(net, group_rank=self.placement.net_ranks(spec.name).index(self.dist.rank))
        optim = self.cfg.optim
        max_norm = clip_threshold(optim.grad_clip, optim.clip_scale, self.task.num_terms(spec.name))
        if self.cfg.dist.engine == "deepspeed":
            return DeepSpeedEngine(
                net,
                optim,
                self.cfg.dist,
                self.total_steps,
                group=group,
                singleton=self.groups.singleton,
                micro_batch=self.train_data.batch_size,
                max_norm=max_norm,
                depths=spec.trained_weights(),
            )
        fp16 = self.precision == "fp16"  # autocast to fp16 with loss scaling
        return TorchEngine(
            net, optim, self.total_steps, group=group, fp16=fp16, max_norm=max_norm, depths=spec.trained_weights()
        )

    @property
    def nets(self) -> dict[str, torch.nn.Module]:
        return {name: engine.module for name, engine in self.engines.items()}

    # ------------------------------------------------------------------ one step

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, logs: bool = True) -> dict[str, float]:
        """One optimizer step of every local net on the batch; returns the loss terms and per-net totals.

        ``logs=False`` returns {} and skips the ``.item()`` calls (a device sync per term on GPUs).
        """
        for engine in self.engines.values():
            engine.module.train(not isinstance(engine, FrozenEngine))
        self.task.set_progress(self.step, self.total_steps)
        self.guard.snapshot()  # skip mode: a skipped step must not leave its BN statistics behind
        x = in_layout(x, self.cfg.train.channels_last)
        if self.part_backward:
            terms = self._backward_in_parts(x, y)
        else:
            with self.autocast():
                terms = self.task.local_terms(self.engines, x, y, self.exchange)
        totals: dict[str, torch.Tensor] = {}
        for name, value in terms.items():
            totals[net_of(name)] = totals.get(net_of(name), 0.0) + value
        for name, engine in self.engines.items():  # a frozen net has no terms: a zero loss, its backward a no-op
            if isinstance(engine, FrozenEngine):
                totals[name] = torch.zeros((), device=self.device)
        if self.part_backward:
            self._step_after_parts(totals)
        else:
            self._update(totals)
        self.step += 1
        if not logs:
            return {}
        out = {f"train/{k}": v.item() for k, v in terms.items()}
        out.update({f"train/loss/{k}": v.item() for k, v in totals.items()})
        for name, engine in self.engines.items():  # is one role clipped and another not?
            out.update({f"train/{key}/{name}": value for key, value in engine.grad_stats().items()})
        out.update(self.guard.metrics())
        out["train/kd_scale"] = self.task.kd_scale
        return out

    def _backward_in_parts(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The forwards and each net's loss backpropagated part by part (``CooperativeTask.backward_local``);
        returns every term's detached value. The backward calls run outside autocast, as a backward should."""

        def backward(name: str, loss: torch.Tensor, last: bool) -> None:
            with torch.autocast(self.device.type, enabled=False):
                self.engines[name].backward(loss, accumulate=not last)

        with self.autocast():
            return self.task.backward_local(self.engines, x, y, self.exchange, backward)

    def _step_after_parts(self, totals: dict[str, torch.Tensor]) -> None:
        """Clip, check and step every local net whose gradients are in (``norm_before_step`` engines are checked
        on gradient norm and loss, the others on the loss); a skipped net's gradients are dropped by its step."""
        norms = {n: e.clip_grads() if e.norm_before_step else None for n, e in self.engines.items()}
        skip = self.guard.check(self.step, totals, norms)
        for name, engine in self.engines.items():
            engine.step(skip=name in skip)

    def _update(self, totals: dict[str, torch.Tensor]) -> None:
        """One summed backward per local net, then as ``_step_after_parts``; unless some engine cannot give its
        gradient norm before its step (DeepSpeed): the nets are then checked on the loss before backward, so a
        non-finite loss skips the backward too. Each net's total touches only its own parameters."""
        if all(engine.norm_before_step for engine in self.engines.values()):
            for name, engine in self.engines.items():
                engine.backward(totals[name])
            self._step_after_parts(totals)
            return
        skip = self.guard.check(self.step, totals)
        for name, engine in self.engines.items():
            if name not in skip:
                engine.backward(totals[name])
        for name, engine in self.engines.items():
            engine.step(skip=name in skip)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Train to ``total_steps``; returns the last evaluation (not logged: the report logs the final metrics).

        When a rank is asked to stop (SIGTERM), every rank finishes the same step, the epoch's evaluation if
        that step ends an epoch, saves a checkpoint and raises ``Preempted``.
        """
        metrics: dict[str, float] = {}
        for x, y in self.batches():
            log_now = self.should_log(self.step + 1)
            with self.meter.step(len(y)):
                logs = self.train_step(x, y, logs=log_now)
            if log_now:
                self.log_step(logs)
            if self.should_eval(self.step):
                metrics = self.evaluate_epoch()
            if self.should_save(self.step):
                self.save()
            if self.guard.stop and self.step < self.total_steps:  # after the last step the run just finishes
                raise Preempted(
                    f"rank {self.dist.rank}: stopped at step {self.step} of {self.total_steps} on a stop signal; "
                    f"checkpoint {checkpoint_dir(self.run_dir, self.step).name} saved; continue with --train.resume=auto"
                )
        return metrics

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The batch of every step from ``self.step`` on (mid-epoch after a resume), epoch after epoch, to
        ``total_steps``, or to the step after which the step guard says a rank was asked to stop."""
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.meter.start_epoch()
            steps = min(self.steps_per_epoch - start, self.total_steps - self.step)
            hide = not (self.cfg.train.progress and self.dist.is_main)
            desc = f"epoch {epoch + 1}/{self.cfg.train.epochs}"
            with tqdm(total=steps, desc=desc, disable=hide, leave=False) as self.bar:
                for x, y in self.train_data.epoch(epoch, start):
                    yield x, y
                    self.bar.update(1)
                    if self.step >= self.total_steps or self.guard.stop:
                        return

    def ends_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.total_steps

    def should_eval(self, step: int) -> bool:
        """Every ``train.eval_every`` epochs and after the last step."""
        epoch = (step - 1) // self.steps_per_epoch
        return self.ends_epoch(step) and ((epoch + 1) % self.cfg.train.eval_every == 0 or step == self.total_steps)

    def should_save(self, step: int) -> bool:
        """Every ``train.checkpoint_every`` steps, at each epoch's end, and when a rank was asked to stop."""
        every = self.cfg.train.checkpoint_every
        return bool(every and step % every == 0) or self.ends_epoch(step) or self.guard.stop

    def log_step(self, logs: dict[str, float]) -> None:
        """The step's losses with throughput, learning rate and skipped samples, gathered and logged on rank 0."""
        logs[f"train/samples_per_s/rank{self.dist.rank}"] = self.meter.epoch_rate()
        logs.update({f"train/lr/{name}": engine.lr() for name, engine in self.engines.items()})  # per net: lr_scale
        logs[f"data/corrupt_skipped/rank{self.dist.rank}"] = float(self.train_data.skipped)
        logs = gather_to_main(self.dist, logs)
        self.tracker.log_metrics(self.step, logs)
        if logs:
            self.bar.set_postfix(loss=f"{sum(v for k, v in logs.items() if k.startswith('train/loss/')):.3f}")

    def evaluate_epoch(self) -> dict[str, float]:
        """The trained depths at an epoch's end; logged unless this is the last step (the report logs those)."""
        metrics = self.evaluate("trained")
        self.evaluated_at = self.step
        if self.step < self.total_steps:
            self.tracker.log_metrics(self.step, metrics)
        self.log(f"epoch {(self.step - 1) // self.steps_per_epoch + 1}: " + self.summary(metrics))
        return metrics

    def evaluate(self, which: str = "all", split: str = "val") -> dict[str, float]:
        """Every local net at the selected depths on ``split`` (``val``; ``train``: the training samples without
        augmentation: ``train_eval/acc1/<net>@<s>``...), sharded over each net's group, sums all-reduced.

        Returns the metrics of all nets on global rank 0 (gathered), {} elsewhere.
        """
        group_rank = self.placement.net_ranks(self.local_specs[0].name).index(self.dist.rank)
        batches = split_batches(self.data, split)
        batches = batches.sharded(group_rank, len(self.placement.net_ranks(self.local_specs[0].name)))
        local: dict[str, float] = {}
        for spec in self.local_specs:
            engine = self.engines[spec.name]
            average_buffers(engine.module, self.groups.net.get(spec.name))  # one model measured, the one saved
            for s in selected_depths(spec, which):
                sums = evaluate_sums(engine.module, batches.epoch(0), s, self.autocast, forward=engine)
                sums = all_reduce_sum(sums, self.groups.net.get(spec.name), self.device)
                for key, value in sums_to_metrics(sums).items():
                    local[f"{METRIC_PREFIX[split]}/{key}/{spec.metric(s)}"] = value
            if split != "val":
                continue
            # do the gates of blocks only deep sub-nets run collapse toward 0?
            with _whole(gate for stage in engine.module.stage_gates() for gate in stage):
                local.update({f"val/gate/{spec.name}/{k}": v for k, v in gate_stats(engine.module).items()})
        return gather_to_main(self.dist, local)

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
        were never updated: a truncated net needs them to be evaluated fairly. Every rank of a
        net's group uses the same samples, so replicas stay identical.
        """
        for spec in self.local_specs:
            engine = self.engines[spec.name]
            frozen = isinstance(engine, FrozenEngine)  # its full depth stays as loaded; its truncations get statistics
            for s in selected_depths(spec, "untrained" if untrained_only else "all"):
                if frozen and s == 1.0:
                    continue
                recalibrate_bn(engine.module, (x.to(engine.dtype) for x in self.data.calibration(num_samples)), s)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Every engine saves into ``checkpoints/step_N/``; then rank 0 writes the trainer state and, last, the tag.

        Every rank agrees on the tag (the step). A crash mid-save leaves the previous tag in force, and so
        do non-finite weights: they are refused (``NonFiniteError``) before anything is written. A full disk on
        any rank stops every rank with one line (``DiskFullError``) after the partial folder is removed.
        """
        folder = checkpoint_dir(self.run_dir, self.step)
        tag = folder.name
        bad = nonfinite_nets(self.nets, self.guard.net_names, self.dist)
        if bad:
            last = latest_checkpoint(self.run_dir)
            raise NonFiniteError(
                f"refusing to save checkpoint {tag}: non-finite weights in {', '.join(bad)}; "
                + (f"the last good checkpoint, {last.name}, is kept" if last else "no checkpoint was written")
            )
        staged = staging_dir(folder)
        if self.dist.is_main:
            discard_staged(staged)  # what a failed save of this step left
        barrier(self.dist)

        def engines() -> None:
            staged.mkdir(parents=True, exist_ok=True)
            for name, engine in self.engines.items():
                engine.save(staged, name)
            fsync_tree(staged)  # this rank's files (DeepSpeed's own too) are on disk before the checkpoint counts

        def trainer_state() -> None:
            if self.dist.is_main:
                state = TrainerState(
                    step=self.step,
                    config=self.cfg.to_dict(),
                    mlflow_run_id=self.tracker.run_id,
                    rng=torch.get_rng_state(),
                    guard=self.guard.state_dict(),
                    inputs=self.inputs,
                    data_shards=self.data_shards,
                    layout=self.layout,
                )
                state.save(staged)
                publish_checkpoint(staged, folder, keep=self.cfg.dist.keep_checkpoints)

        for part in (engines, trainer_state):
            self._write_or_stop(part, staged)
        return folder

    def _write_or_stop(self, write: Callable[[], None], folder: Path) -> None:
        """``write`` on every rank; if a disk is full on any rank, every rank stops with one line once rank 0
        has removed the partial checkpoint (the previous ``latest`` stays in force). Collective."""
        error = None
        try:
            write()
        except Exception as e:
            if not is_disk_full(e):
                raise
            error = e
        failed = all_reduce_world(torch.tensor([float(error is not None)], device=self.device), self.dist)
        if failed.item() == 0:
            return
        if self.dist.is_main:
            discard_staged(folder)
        barrier(self.dist)
        last = latest_checkpoint(self.run_dir)
        where = disk_full_line(folder.parent) if error is not None else "the disk of another rank"
        raise DiskFullError(
            f"no space left on device saving checkpoint {folder.name} at step {self.step} in {self.run_dir / CHECKPOINTS} "
            f"({where}); the partial checkpoint was removed and "
            + (f"{last.name} stays the latest" if last else "no checkpoint was written")
            + "; free space, then continue with --train.resume=auto"
        ) from error

    def resume(self, folder: str | Path) -> None:
        """Load every local engine and the trainer state from a checkpoint folder (``checkpoints/step_N``), also one
        saved on another world size or placement (``dist_coop/distributed/resize.py``); the trainer must have been
        built with that checkpoint's ``data_shards``."""
        folder = Path(folder)
        state = TrainerState.load(folder)
        if (state.data_shards or self.placement.num_shards) != self.data_shards:
            raise ValueError(
                f"{folder} splits the run's data in {state.data_shards} data shards but this trainer was built for "
                f"{self.data_shards}: build it with data_shards=TrainerState.load(checkpoint).data_shards"
            )
        for name, engine in self.engines.items():
            engine.load(folder, name)
        self.step = state.step
        torch.set_rng_state(state.rng)
        self.guard.load_state_dict(state.guard)
        global_batch = self.train_data.batch_size * self.placement.num_shards
        self.log(resume_line(folder, self.step, state.layout, self.layout, global_batch))

    def launch_params(self) -> dict[str, str]:
        """This launch's world, micro-batch and precision as tracker params, logged with the config's: a resume that
        changes them is recorded as tags such as ``resume/1/launch.world`` = ``"6 ranks split -> 3 ranks split"``."""
        return {**launch_params(self.layout), "launch.precision": self.precision}
