"""A run continued on another world size or placement (a node lost for good, or one added).

* **Data.** A run's data is split in ``data_shards`` virtual data shards: its exchange groups when it first
  started, kept in every checkpoint. A launch with G exchange groups needs G to divide that number; exchange
  group k then reads virtual shards k V/G .. (k + 1) V/G - 1, one batch of each per step
  (``dist_coop.data.batches.virtual_shards``), so the micro-batch grows by V/G while the global batch, the steps
  per epoch and the LR schedule stay those of the first launch, and every sample of an epoch is seen once.
* **Optimizer state.** The torch engine saves it whole; DeepSpeed ZeRO-0 too. ZeRO 1-2 save one partition per
  rank of the net's group: ``reshard_zero_partitions`` cuts the saved partitions into those of a group of another
  size. ZeRO-3 partitions are refused on another group size (``load_deepspeed_checkpoint``).
* **BN statistics** of the replicas (``<net>.rank<k>.pt``): ``dist_coop.distributed.engine.load_replica_buffers``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_coop.distributed.placement import Placement

ZERO_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


# ---------------------------------------------------------------- the layout of a launch


def layout_of(placement: Placement, micro_batch: int) -> dict[str, Any]:
    """What a checkpoint keeps of the launch that saved it (``TrainerState.layout``)."""
    return {"world_size": placement.world_size, "placement": placement.kind, "micro_batch": micro_batch}


def describe(layout: dict[str, Any]) -> str:
    """``"6 ranks split"``."""
    n = layout["world_size"]
    return f"{n} rank{'s' if n != 1 else ''} {layout['placement']}"


def launch_params(layout: dict[str, Any]) -> dict[str, str]:
    """The launch's layout as tracker params: a resume that changes it is recorded as a tag
    ``resume/<n>/launch.world`` = ``"6 ranks split -> 3 ranks split"`` (``MlflowTracker.log_params``)."""
    return {"launch.world": describe(layout), "launch.micro_batch": str(layout["micro_batch"])}


def world_sizes(data_shards: int, kind: str, num_nets: int) -> list[int]:
    """The world sizes whose exchange groups divide ``data_shards`` under ``dist.placement`` ``kind``."""
    divisors = [d for d in range(1, data_shards + 1) if data_shards % d == 0]
    split = [num_nets * d for d in divisors]
    if kind == "split":
        return split
    if kind == "colocated":
        return divisors
    return sorted(set(divisors) | set(split))  # auto: colocated or split, each has a divisor's groups


def check_data_shards(data_shards: int, placement: Placement, kind: str) -> None:
    """Refuse a launch whose exchange groups cannot share the run's virtual data shards evenly."""
    groups = placement.num_shards
    if data_shards % groups == 0:
        return
    sizes = ", ".join(map(str, world_sizes(data_shards, kind, len(placement.net_names))))
    raise ValueError(
        f"this run's data is split in {data_shards} data shards (its exchange groups when it first started) and "
        f"{groups} exchange groups ({describe(layout_of(placement, 0))}) cannot share them evenly; launch it on a "
        f"world size of {sizes} (dist.placement {kind})"
    )


def resume_line(folder: Path, step: int, saved: dict[str, Any], now: dict[str, Any], global_batch: int) -> str:
    """``resumed from <ckpt> at step N``, and where the layout changed, how: ``on 3 ranks (split, was 6 ranks
    split): micro-batch 32 -> 64, global batch 192 unchanged``."""
    line = f"resumed from {folder} at step {step}"
    if not saved or saved == now:
        return line
    was, batch = saved["micro_batch"], now["micro_batch"]
    micro = f"micro-batch {was} -> {batch}" if was != batch else f"micro-batch {batch}"
    ranks = describe(now).removesuffix(f" {now['placement']}")
    return (
        f"{line} on {ranks} ({now['placement']}, was {describe(saved)}): {micro}, global batch {global_batch} unchanged"
    )


# ---------------------------------------------------------------- DeepSpeed ZeRO partitions


def saved_zero_files(tag_dir: Path) -> list[Path]:
    """The ZeRO optimizer files of a DeepSpeed checkpoint, by the data-parallel rank that wrote them."""
    found = [(int(m.group(1)), p) for p in tag_dir.iterdir() if (m := ZERO_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def load_deepspeed_checkpoint(engine: Any, save_dir: Path, tag: str) -> str | None:
    """``engine.load_checkpoint``, also from a checkpoint that a data-parallel group of another size saved: ZeRO-0
    loads as it is, ZeRO 1-2 partitions are resharded, ZeRO-3 is refused. Returns the path loaded (None: none)."""
    files = saved_zero_files(save_dir / tag) if (save_dir / tag).is_dir() else []
    size = engine.dp_world_size
    if not files or len(files) == size:
        path, _ = engine.load_checkpoint(str(save_dir), tag=tag)
        return path
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        stage = engine.zero_optimization_stage()
        raise ValueError(
            f"{save_dir / tag}: DeepSpeed ZeRO-{stage} partitions saved by {len(files)} ranks per net cannot be "
            f"loaded by {size}: relaunch with {len(files)} ranks per net (only ZeRO 0-2 checkpoints load on another "
            "number of ranks)"
        )
    path, _ = engine.load_checkpoint(str(save_dir), tag=tag, load_optimizer_states=False)  # weights, LR schedule
    if path is not None:
        saved = [engine.checkpoint_engine.load(str(f), map_location="cpu")["optimizer_state_dict"] for f in files]
        reshard_zero_partitions(engine.optimizer, saved)
    return path


def reshard_zero_partitions(optimizer: Any, saved: list[dict[str, Any]]) -> None:
    """Give a ZeRO 1-2 optimizer (``DeepSpeedZeroOptimizer``) this rank's partition of the fp32 weights and of the
    optimizer state (momentum, Adam moments, step) from ``saved``: the optimizer state dicts that the ranks of a
    group of another size wrote, in rank order.

    Each param group is one flat vector cut in equal partitions, padded at its end; a checkpoint keeps each rank's
    fp32 partition without that padding, and its state tensors with it (cut here to the same length). The saved
    partitions, concatenated, are the flat vector; this rank takes its slice of it, padded for the new group. The
    hyperparameters (the LR the schedule reached) come back with them.
    """
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        PARAM_ALIGNMENT_PADDINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    group = optimizer.dp_process_group
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if optimizer.round_robin_gradients or saved[0].get(PARAM_ALIGNMENT_PADDINGS) != optimizer.round_robin_bit16_padding:
        raise ValueError(
            "a ZeRO checkpoint saved with zero_optimization.round_robin_gradients or another parameter_alignment "
            "cannot be resharded; resume it on the world size that saved it"
        )
    optimizer._load_global_state(saved[0])  # loss scaler, clipping: what DeepSpeed's own load restores first
    for i, param_group in enumerate(optimizer.optimizer.param_groups):
        mine = optimizer.single_partition_of_fp32_groups[i]
        n = mine.numel()
        pieces = [sd[SINGLE_PARTITION_OF_FP32_GROUPS][i].reshape(-1) for sd in saved]
        lengths = [p.numel() for p in pieces]
        expected = sum(p.numel() for p in optimizer.round_robin_bit16_groups[i]) + sum(
            optimizer.round_robin_bit16_padding[i]
        )
        assert sum(lengths) == expected <= n * size, (sum(lengths), expected, n, size)
        with torch.no_grad():
            mine.copy_(_partition(pieces, rank, n, size))
        base = [sd[BASE_OPTIMIZER_STATE] for sd in saved]
        states = [b["state"].get(b["param_groups"][i]["params"][0], {}) for b in base]
        state = optimizer.optimizer.state[param_group["params"][0]]
        for key, value in states[0].items():
            if torch.is_tensor(value) and value.dim() > 0:  # partitioned with the weights
                value = _partition([s[key].reshape(-1)[:k] for s, k in zip(states, lengths)], rank, n, size)
                value = value.to(mine.device)
            elif torch.is_tensor(value):
                value = value.clone()
            if torch.is_tensor(state.get(key)) and torch.is_tensor(value) and state[key].shape == value.shape:
                state[key].copy_(value)
            else:
                state[key] = value
        param_group.update({k: v for k, v in base[0]["param_groups"][i].items() if k != "params"})


def _partition(parts: list[torch.Tensor], rank: int, n: int, size: int) -> torch.Tensor:
    """Partition ``rank`` (``n`` elements) of the flat vector ``parts`` concatenated, zero-padded to ``n * size``."""
    flat = torch.cat(parts)
    whole = flat.new_zeros(n * size)
    whole[: flat.numel()] = flat
    return whole[rank * n : (rank + 1) * n]
