"""Distributed state, made explicit and small: ``DistInfo`` is read once and passed around.

``init_distributed`` reads what the launchers set (``torchrun`` and ``deepspeed`` both export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), picks the backend (NCCL on GPUs,
gloo on CPUs) and starts the default process group. Without those variables it is a world of
one process; DeepSpeed still needs a process group then, so one of size 1 is started on a free
local port.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" = no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return bool(self.backend)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def single_process(device_name: str = "auto") -> DistInfo:
    """The world of one process (no process group)."""
    return DistInfo(device=resolve_device(device_name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    device_name: str = "auto",
    *,
    backend: str = "auto",
    need_group: bool = False,
    timeout_s: int = 600,
    env: Mapping[str, str] | None = None,
) -> DistInfo:
    """Start the default process group from the launcher's variables (or a world of one)."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size == 1 and not need_group:
        return DistInfo(device=device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in env:  # a world of one started by plain `python`
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timeout, store=_restart_safe_store(env, world_size, timeout)
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _restart_safe_store(env: Mapping[str, str], world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun the workers share the agent's store across restarts; keys a dead generation wrote
    (gloo's peer addresses) would be read by the next one, which then connects to dead ports. A prefix
    per restart keeps generations apart. Elsewhere: None (the default ``env://`` init)."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_coop/restart_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def close_distributed(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()
