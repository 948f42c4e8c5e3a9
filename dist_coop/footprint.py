"""How many bytes one checkpoint of a net takes, from the net's parameter and buffer counts (``dist-coop plan``).

Per net and checkpoint, with P parameters, S optimizer values per parameter (SGD with momentum 1, without 0, AdamW
2) and D ranks in the net's group:

* **torch engine**, and DeepSpeed ZeRO-0 in fp32: ``<net>.pt`` on the group's rank 0 holds the fp32 weights, the BN
  statistics and the optimizer state (4 P + 4 S P bytes); every other rank of the group writes its own BN
  statistics (``<net>.rank<r>.pt``).
* **DeepSpeed ZeRO-0 in bf16 / fp16**: the weights in 2 bytes, an fp32 master copy (4 P) and the state, on rank 0.
* **DeepSpeed ZeRO-1/2**: rank 0 writes the weights in the engine's dtype and the BN statistics; the fp32 master
  copy and the optimizer state (4 P + 4 S P) are cut into D partitions, one file per rank.
* **DeepSpeed ZeRO-3**: the weights are partitioned too; only the master copy's and the state's partitions are
  written, 1 / D per rank (an estimate: not measured here).

DeepSpeed keeps the BN statistics (buffers) in fp32 under bf16 / fp16. ``torch.save`` adds about 300 bytes per
tensor (its zip record and pickle), counted for the files that hold one tensor per parameter; DeepSpeed's fp32
partitions are flat. DeepSpeed also copies its ``zero_to_fp32.py`` script (~40 KB) beside ZeRO-1+ checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

TENSOR_OVERHEAD = 300  # bytes torch.save adds per tensor
STATE_VALUES = {"sgd": 1, "adamw": 2}  # optimizer values kept per parameter (SGD: with momentum)
STATE_NAMES = {"sgd": "SGD momentum", "adamw": "AdamW moments"}


@dataclass(frozen=True)
class NetBytes:
    """One net's share of a checkpoint, in bytes."""

    name: str
    weights: int  # the weights in the dtype the engine saves them in
    weight_dtype: str  # fp32 | bf16 | fp16
    buffers: int  # BN statistics and other buffers, one replica's
    master: int  # the fp32 master copy (DeepSpeed in bf16 / fp16, or ZeRO-1+)
    state: int  # the optimizer state
    overhead: int  # torch.save's records
    group_size: int  # D: ranks of the net's group
    zero_stage: int  # -1: the torch engine
    on_rank0: int  # what the group's rank 0 writes (the largest share)

    @property
    def total(self) -> int:
        """The net's files in one checkpoint, every rank's together."""
        return self.weights + self.buffers * self.group_size + self.master + self.state + self.overhead


def net_bytes(
    name: str,
    net: nn.Module,
    *,
    optimizer: str,
    momentum: float,
    engine: str,
    zero_stage: int,
    precision: str,
    group_size: int,
) -> NetBytes:
    """The bytes of ``net``'s files in one checkpoint (``net`` may be on the meta device: only counts are read)."""
    params = list(net.parameters())
    buffers = list(net.buffers())
    p = sum(t.numel() for t in params)
    buf = sum(t.numel() * t.element_size() for t in buffers)
    values = STATE_VALUES[optimizer] if optimizer != "sgd" or momentum > 0 else 0
    deepspeed = engine == "deepspeed"
    stage = zero_stage if deepspeed else -1
    mixed = deepspeed and precision in ("bf16", "fp16")
    weight_dtype = precision if mixed else "fp32"
    weights = 0 if stage == 3 else p * (2 if mixed else 4)
    master = 4 * p if mixed or stage >= 1 else 0
    state = 4 * values * p
    records = len(params) + len(buffers)  # the module's state dict
    if stage <= 0:
        records += values * len(params) + (len(params) if optimizer == "adamw" else 0)  # per-parameter state, steps
    overhead = TENSOR_OVERHEAD * (records + len(buffers) * (group_size - 1))
    if stage >= 1:  # master copy and state in D partitions, one per rank
        on_rank0 = weights + buf + (master + state) // group_size
    else:
        on_rank0 = weights + buf + master + state
    return NetBytes(name, weights, weight_dtype, buf, master, state, overhead, group_size, stage, on_rank0)


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def describe(b: NetBytes, optimizer: str) -> str:
    """``leader 171.6 MB: fp32 weights 85.5 MB + SGD momentum 85.5 MB + buffers 0.3 MB; rank 0 of its group writes
    it`` (the parts that are there)."""
    parts = [f"{b.weight_dtype} weights {megabytes(b.weights)}"] if b.weights else []
    parts += [f"fp32 master copy {megabytes(b.master)}"] if b.master else []
    parts += [f"{STATE_NAMES[optimizer]} {megabytes(b.state)}"] if b.state else []
    replicas = f" x {b.group_size} ranks" if b.group_size > 1 else ""
    parts.append(f"BN statistics {megabytes(b.buffers)}{replicas}")
    if b.zero_stage >= 1 and b.group_size > 1:
        where = f"ZeRO-{b.zero_stage}: master copy and state in {b.group_size} partitions, rank 0 writes {megabytes(b.on_rank0)}"
    elif b.zero_stage >= 1:
        where = f"ZeRO-{b.zero_stage} on one rank"
    else:
        where = "rank 0 of its group writes it" if b.group_size > 1 else "one rank writes it"
    each = " each" if "," in b.name else ""
    return f"{b.name} {megabytes(b.total)}{each}: {' + '.join(parts)}; {where}"
