"""Training engines: one per net on a rank. The loop calls ``backward``, ``step``, ``save``, ``load``.

``backward`` may run several times before one ``step`` (a net's loss backpropagated part by part,
``CooperativeTask.backward_local``): gradients accumulate, every call but the last of the step with
``accumulate=True``; the reduction over the net's group, clipping and the update happen once.

* ``TorchEngine``: plain PyTorch. The net's optimizer and schedule; in a group of D > 1 ranks the
  gradients are averaged over the net's data-parallel group (one flattened all-reduce) before
  clipping and the step: what DDP does, without DDP's one-forward-per-backward restriction
  (a step here runs several depths of the same module before one backward).
* ``DeepSpeedEngine``: ``deepspeed.initialize`` over the net's own data-parallel group (given to
  DeepSpeed as its ``mpu``), ZeRO stage 0-3, bf16/fp16, clipping, from ``deepspeed_config``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dist_coop.checkpoint import (
    deepspeed_save_dir,
    deepspeed_save_target,
    load_checkpoint,
    net_file,
    replica_file,
    save_checkpoint,
)
from dist_coop.config import DistConfig, OptimConfig
from dist_coop.distributed.comm import average_in_place
from dist_coop.distributed.env import ignore_deepspeed_deprecations
from dist_coop.distributed.resize import load_deepspeed_checkpoint
from dist_coop.models.adaptive import AdaptiveNet
from dist_coop.optim import Depths, build_optimizer, build_scheduler
from dist_coop.precision import resolve_precision

# DeepSpeed's CPU shared-memory collective (a C++ op compiled on first use, ~1 min on 2 cores, and needing a
# compiler). DeepSpeed's communicator builds it when it starts, yet only its tensor-parallel inference
# all-reduce uses it: training's collectives go through torch.distributed (gloo or NCCL) either way.
SHM_OP = "deepspeed_shm_comm"


def skip_deepspeed_shm_op() -> None:
    """Mark DeepSpeed's shared-memory comm op as unavailable before its communicator starts, so that no rank
    compiles or loads an op training never calls (its ``build_shm_op`` returns None for an op marked so;
    DeepSpeed keeps that table in one dict so that edits to it persist). A no-op once the communicator is up."""
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        return
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible[SHM_OP] = False


class _NetAccess:
    """What the task needs of an engine besides the forward: depth scopes and the gates."""

    module: AdaptiveNet

    def at_depth(self, s: float) -> AbstractContextManager[AdaptiveNet]:
        return self.module.at_depth(s)

    def set_depth(self, s: float) -> None:
        self.module.set_depth(s)

    def branch_starts(self, depths: Sequence[float]) -> dict[float, int]:
        return self.module.branch_starts(depths)

    def stage_gates(self) -> list[list[torch.nn.Parameter]]:
        return self.module.stage_gates()


def clip_threshold(grad_clip: float, clip_scale: str, num_terms: int) -> float:
    """Max gradient norm of a net: ``grad_clip``, times its number of loss terms with ``clip_scale: terms``.

    A Teammate sums ~12 terms, the Leader 1: one absolute threshold throttles the Teammates on
    every step while it rarely touches the Leader. Scaled, it is the same safety net for every role.
    """
    if grad_clip <= 0:
        return 0.0
    return grad_clip * (num_terms if clip_scale == "terms" else 1)


def clip_gradients(module: torch.nn.Module, max_norm: float) -> Tensor:
    """The total norm of ``module``'s gradients (on device, no sync); they are scaled down to ``max_norm`` when
    it is above (no multiply by 1 on every step when ``max_norm`` is 0, clipping off)."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def advance_schedule(scheduler: Any) -> None:
    """Step the schedule of a skipped update, so every net stays at the loop's step (quietly: torch warns
    when the first scheduler step comes before any optimizer step)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


class TorchEngine(_NetAccess):
    norm_before_step = True  # the step guard can check the gradient norm before the update
    dtype = torch.float32  # inputs are not cast (autocast, where on, is the loop's)

    def __init__(
        self,
        net: AdaptiveNet,
        optim_cfg,
        total_steps: int,
        *,
        group: Any = None,
        fp16: bool = False,
        max_norm: float | None = None,
        depths: Depths = (1.0,),
    ) -> None:
        self.module = net
        self.optim_cfg = optim_cfg
        self.max_norm = optim_cfg.grad_clip if max_norm is None else max_norm
        self.grad_norm: Tensor | None = None  # of the last step, before clipping (read only when logging)
        self._clipped = False  # clip_grads ran for the pending step
        self.optimizer = build_optimizer(net, optim_cfg, depths)
        self.scheduler = build_scheduler(self.optimizer, total_steps, optim_cfg)
        self.scaler = torch.amp.GradScaler(enabled=fp16)
        self.group = group
        self.group_size = dist.get_world_size(group) if group is not None else 1
        self.group_rank = dist.get_rank(group) if group is not None else 0

    def __call__(self, x: Tensor, **kwargs: Any) -> Any:
        """The net's forward (``AdaptiveNet.forward``'s keywords pass through)."""
        return self.module(x, **kwargs)

    def backward(self, loss: Tensor, *, accumulate: bool = False) -> None:
        """Add ``loss``'s gradients (loss-scaled under fp16) to ``.grad``; ``accumulate``: more follow before the
        step (nothing differs here: the group's all-reduce and the unscaling wait for ``clip_grads``)."""
        self.scaler.scale(loss).backward()

    def _average_gradients(self) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if self.group_size == 1 or not grads:
            return
        average_in_place(grads, self.group)

    def clip_grads(self) -> Tensor | None:
        """Average over the group, unscale and clip; returns the norm before clipping (on device, no sync).

        None under fp16 loss scaling: a non-finite norm is routine there and the scaler skips that step itself.
        """
        self._average_gradients()
        self.scaler.unscale_(self.optimizer)
        self.grad_norm = clip_gradients(self.module, self.max_norm)  # measured every step: train/grad_norm
        self._clipped = True
        return None if self.scaler.is_enabled() else self.grad_norm

    def step(self, skip: bool = False) -> None:
        """The update (``skip``: drop this step's gradients instead); the schedule advances either way."""
        if not self._clipped:
            self.clip_grads()
        self._clipped = False
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            advance_schedule(self.scheduler)
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        """The current LR of the net's shared weights (the smallest of its groups: optim.lr_scale)."""
        return min(self.scheduler.get_last_lr())

    def grad_stats(self) -> dict[str, float]:
        """Gradient norm of the last step and the factor clipping scaled it by (1 = untouched). Syncs."""
        if self.grad_norm is None:
            return {}
        return grad_stats(self.grad_norm.item(), self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "group_size": self.group_size,  # the replicas that saved it (their BN statistics: load_replica_buffers)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def save(self, folder: Path, name: str) -> None:
        """Replicas are identical: group rank 0 writes the state, the others their BN statistics only."""
        if self.group_rank == 0:
            save_checkpoint(self.state_dict(), net_file(folder, name))
        save_replica_buffers(self.module, self.group_rank, folder, name)

    def load(self, folder: Path, name: str) -> None:
        """The whole state (any group size: the optimizer state is not partitioned), then the BN statistics."""
        state = load_checkpoint(net_file(folder, name), next(self.module.parameters()).device)
        self.load_state_dict(state)
        saved = state.get("group_size")  # None: a checkpoint that does not keep it
        load_replica_buffers(self.module, self.group_rank, folder, name, group_size=self.group_size, saved_size=saved)


def save_replica_buffers(module: torch.nn.Module, group_rank: int, folder: Path, name: str) -> None:
    """Group rank 0 saves the module; replica r > 0 keeps its BN statistics, gathered on its own shard of the
    data, in ``<name>.rank<r>.pt``, so a resumed run equals an uninterrupted one (both engines)."""
    if group_rank:
        save_checkpoint(dict(module.named_buffers()), replica_file(folder, name, group_rank))


def load_replica_buffers(
    module: torch.nn.Module,
    group_rank: int,
    folder: Path,
    name: str,
    *,
    group_size: int | None = None,
    saved_size: int | None = None,
) -> None:
    """After the module (group rank 0's statistics) is loaded: replica r of a group of the size that saved the
    checkpoint takes its own statistics back. In a group of another size (a run resumed on another world) every
    replica takes the mean of the saved replicas' floating-point statistics: the statistics evaluation measures
    (``average_buffers``), the same on every replica. ``saved_size`` None: not known (the saved size assumed)."""
    if saved_size is None or saved_size == group_size:
        own = replica_file(folder, name, group_rank)
        if group_rank and own.is_file():  # a checkpoint without replica files: rank 0's then
            buffers = load_checkpoint(own, next(module.parameters()).device)
            with torch.no_grad():
                for key, b in module.named_buffers():
                    b.copy_(buffers[key])
        return
    others = [f for k in range(1, saved_size) if (f := replica_file(folder, name, k)).is_file()]
    floats = {key: b for key, b in module.named_buffers() if b.is_floating_point()}
    with torch.no_grad():
        for path in others:
            buffers = load_checkpoint(path, next(module.parameters()).device)
            for key, b in floats.items():
                b.add_(buffers[key])
        for b in floats.values():
            b.div_(1 + len(others))


class GroupMPU:
    """What DeepSpeed asks an ``mpu`` for: data parallel = the net's group, no model parallelism."""

    def __init__(self, dp_group: Any, singleton: Any) -> None:
        self.dp, self.one = dp_group, singleton

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp)

    def get_model_parallel_group(self):
        return self.one

    get_tensor_model_parallel_group = get_model_parallel_group
    get_pipe_parallel_group = get_model_parallel_group
    get_slice_parallel_group = get_model_parallel_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_pipe_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_sequence_parallel_world_size = get_model_parallel_world_size

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_pipeline_model_parallel_rank = get_model_parallel_rank
    get_slice_parallel_rank = get_model_parallel_rank
    get_sequence_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()


def grad_stats(norm: float, max_norm: float) -> dict[str, float]:
    """``{"grad_norm": n, "clip_coef": min(1, max_norm / n)}`` (clip_coef 1 when clipping is off)."""
    coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
    return {"grad_norm": norm, "clip_coef": coef}


def deepspeed_config(
    optim: OptimConfig,
    dist_cfg: DistConfig,
    *,
    micro_batch: int,
    dp_size: int,
    device: torch.device | str,
    max_norm: float | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from our YAML in this one place.

    From the ``optim`` (clipping; precision: ``optim.amp`` on ``device`` as ``resolve_precision`` decides it for
    both engines, so ``auto`` is bf16 or fp16 here as it is under the torch engine) and ``dist`` (ZeRO stage)
    sections; ``dist.deepspeed_extra`` keys are merged over the result.
    """
    precision = resolve_precision(optim.amp, device)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * dp_size,
        "gradient_clipping": optim.grad_clip if max_norm is None else max_norm,
        "zero_optimization": {"stage": dist_cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # every rank saves under the same tag (DeepSpeedEngine.save): a differing one is a bug, not a warning
        "checkpoint": {"tag_validation": "Fail"},
    }
    for key, value in dist_cfg.deepspeed_extra.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


class DeepSpeedEngine(_NetAccess):
    # DeepSpeed computes the gradient norm inside its step, and its fp16 / bf16 / ZeRO optimizers skip a
    # non-finite gradient themselves (its overflow handling): the step guard checks the loss (fp32 ZeRO-0 with
    # clipping on: this engine clips, and the guard checks the gradient norm too)
    norm_before_step = False

    def __init__(
        self,
        net: AdaptiveNet,
        optim: OptimConfig,
        dist_cfg: DistConfig,
        total_steps: int,
        *,
        group: Any,
        singleton: Any,
        micro_batch: int,
        max_norm: float | None = None,
        depths: Depths = (1.0,),
    ) -> None:
        ignore_deepspeed_deprecations()
        import deepspeed

        skip_deepspeed_shm_op()
        optimizer = build_optimizer(net, optim, depths)
        scheduler = build_scheduler(optimizer, total_steps, optim)
        dp_size = dist.get_world_size(group)
        self.max_norm = optim.grad_clip if max_norm is None else max_norm
        # fp32 ZeRO-0: DeepSpeed would clip with a Python loop over parameters (a norm and a multiply kernel
        # each, plus an all-reduce of the norm); the gradients are whole on every rank, so this engine clips
        # them as the torch engine does (two foreach kernels) and DeepSpeed is told not to
        device = next(net.parameters()).device
        fp32 = resolve_precision(optim.amp, device) == "fp32"
        self.own_clipping = dist_cfg.zero_stage == 0 and fp32 and self.max_norm > 0
        self.config = deepspeed_config(
            optim,
            dist_cfg,
            micro_batch=micro_batch,
            dp_size=dp_size,
            device=device,
            max_norm=0.0 if self.own_clipping else self.max_norm,
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=net,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.config,
            mpu=GroupMPU(group, singleton),
            dist_init_required=False,
        )
        self.module: AdaptiveNet = self.engine.module
        self.dtype = (
            torch.bfloat16
            if self.config["bf16"]["enabled"]
            else torch.float16
            if self.config["fp16"]["enabled"]
            else torch.float32
        )
        if self.own_clipping:
            self.norm_before_step = True  # the guard can read this net's gradient norm, as with the torch engine
        if self.config["zero_optimization"]["stage"] == 0 and dp_size == 1:
            self.engine.enable_backward_allreduce = False  # a group of one: its all-reduce is a copy and a launch
        self.grad_norm: Tensor | None = None

    def __call__(self, x: Tensor, **kwargs: Any) -> Any:
        """The net's forward through DeepSpeed's (``AdaptiveNet.forward``'s keywords pass through)."""
        return self.engine(x.to(self.dtype), **kwargs)

    def backward(self, loss: Tensor, *, accumulate: bool = False) -> None:
        """DeepSpeed's backward of ``loss``; ``accumulate``: more backward calls follow before the step.

        With ``gradient_accumulation_steps: 1`` DeepSpeed takes every backward for the boundary of an
        accumulation window (ZeRO-0 all-reduces there, ZeRO-1/2 move the reduced partition into the
        optimizer's buffer, dropping what earlier calls accumulated). ``set_gradient_accumulation_boundary``
        is its documented way to run several backward calls before one step: every call but the last is
        marked as inside the window, so gradients accumulate (ZeRO-2 still reduces each call's partition)
        and the last call reduces once. No loss is divided: the accumulation steps stay 1.

        ZeRO-3 is refused: it adds a window's later backward calls to gradient partitions that only its
        first call overwrites, so a parameter first reached by a later call (the shared part of a net's
        depths) would get the previous step's gradient too.
        """
        if accumulate and self.engine.zero_optimization_stage() == 3:
            raise ValueError(
                "a backward in parts (several backward calls before one step) needs DeepSpeed ZeRO stage 0-2; "
                "ZeRO-3 would add the previous step's gradient to parameters the first call does not reach"
            )
        self.engine.set_gradient_accumulation_boundary(not accumulate)
        self.engine.backward(loss)

    def clip_grads(self) -> Tensor | None:
        """fp32 ZeRO-0 (``own_clipping``): after the backward's all-reduce, the norm of the whole gradients
        and the clipping, as ``TorchEngine.clip_grads``; returns the norm before clipping. None otherwise
        (DeepSpeed clips inside its step)."""
        if not self.own_clipping:
            return None
        self.grad_norm = clip_gradients(self.module, self.max_norm)
        return self.grad_norm

    def step(self, skip: bool = False) -> None:
        """DeepSpeed's step: clipping, optimizer, scheduler, zero_grad. ``skip``: no update, the gradients of
        any backward run this step are dropped, the schedule advances."""
        if skip:
            self._drop_gradients()
            advance_schedule(self.engine.lr_scheduler)
            return
        self.engine.step()

    def _drop_gradients(self) -> None:
        """What DeepSpeed's own step does with gradients it will not apply (its fp16 overflow path)."""
        optimizer, stage = self.engine.optimizer, self.engine.zero_optimization_stage()
        self.engine.zero_grad()
        optimizer.zero_grad(set_to_none=True)  # ZeRO-3: also restarts its accumulation; bf16: its fp32 copies too
        if stage in (1, 2):  # the reduced partition waiting for the step
            if optimizer.cpu_offload:
                optimizer.reset_cpu_buffers()
            else:
                for key in list(optimizer.averaged_gradients):
                    optimizer.averaged_gradients[key] = None
                    optimizer.all_grad_tensors[key] = None
            optimizer.micro_step_id = -1  # as its step() leaves it: the next window starts afresh
        elif stage == 3:
            if optimizer.offload_optimizer:
                optimizer.reset_cpu_buffers()
            else:
                optimizer.averaged_gradients = {}

    def lr(self) -> float:
        return min(self.engine.get_lr())

    def grad_stats(self) -> dict[str, float]:
        """Gradient norm of the last step (DeepSpeed's global norm, or this engine's) and the clip factor."""
        if self.own_clipping:
            return {} if self.grad_norm is None else grad_stats(self.grad_norm.item(), self.max_norm)
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return {}
        return grad_stats(float(norm), self.max_norm)

    def save(self, folder: Path, name: str) -> None:
        """Into ``<folder>/<name>/<folder name>/`` (e.g. ``step_00000010/leader/step_00000010/``): the tag is the
        step, the same on every rank (``deepspeed_save_target``)."""
        save_dir, tag = deepspeed_save_target(folder, name)
        self.engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
        save_replica_buffers(self.module, self.engine.mpu.get_data_parallel_rank(), folder, name)

    def load(self, folder: Path, name: str) -> None:
        from dist_coop.distributed.safe_load import deepspeed_loads_weights_only

        save_dir, tag = deepspeed_save_dir(folder, name)
        with deepspeed_loads_weights_only():  # DeepSpeed's own torch.load calls unpickle anything otherwise
            path = load_deepspeed_checkpoint(self.engine, save_dir, tag)  # saved by a group of any size (ZeRO 0-2)
        if path is None:
            raise ValueError(f"DeepSpeed checkpoint not found: {folder / name}")
        mpu = self.engine.mpu
        saved = self.engine.loaded_checkpoint_dp_world_size
        size = mpu.get_data_parallel_world_size()
        load_replica_buffers(self.module, mpu.get_data_parallel_rank(), folder, name, group_size=size, saved_size=saved)
