"""Distributed state, made explicit and small: ``DistInfo`` is read once and passed around.

``init_distributed`` reads what the launchers set (``torchrun`` and ``deepspeed`` both export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), picks the backend (NCCL on GPUs,
gloo on CPUs) and starts the default process group. Without those variables it is a world of
one process; DeepSpeed still needs a process group then, so one of size 1 is started over a store
in this process: a world of one opens no socket for a rendezvous, and ranks that all run on this
machine meet on the loopback interface only.

Every wait on other ranks is bounded by ``dist.timeout_s``: forming the group, every collective of
every group (ours and those a library such as DeepSpeed makes later), so a rank whose peers are
gone or stalled fails with :class:`PeerTimeoutError` or a backend error that
:func:`peer_failure` turns into one line, instead of waiting for torch's 30-minute default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from dist_coop.config import check_device
from dist_coop.distributed.slurm import slurm_launch_env


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" = no process group
    timeout_s: float = 600.0  # every wait on other ranks gives up after this long (dist.timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return bool(self.backend)


def resolve_device(name: str, local_rank: int = 0, *, field: str = "train.device") -> torch.device:
    """The device ``field`` names, checked to be a valid name and present here (a ValueError says which not).

    ``auto`` is ``cuda:<local_rank>`` when there is a GPU, else the CPU; ``cuda`` is ``cuda:<local_rank>``;
    ``cuda:N`` is that GPU, which must exist.
    """
    check_device(name, field)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if not name.startswith("cuda"):
        return torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = "" if torch.version.cuda else f" (and torch {torch.__version__} is built without CUDA)"
        raise ValueError(f"{field} is {name!r} but no CUDA GPU is present on this machine{build}; use auto or cpu")
    if ":" not in name:
        return torch.device(f"cuda:{local_rank}")
    index = int(name.split(":")[1])
    if index >= count:
        raise ValueError(f"{field} is {name!r} but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}")
    return torch.device(f"cuda:{index}")


def single_process(device_name: str = "auto") -> DistInfo:
    """The world of one process (no process group)."""
    return DistInfo(device=resolve_device(device_name))


class PeerTimeoutError(RuntimeError):
    """Other ranks did not answer within ``dist.timeout_s``."""


def init_distributed(
    device_name: str = "auto",
    *,
    backend: str = "auto",
    need_group: bool = False,
    timeout_s: float = 600,
    env: Mapping[str, str] | None = None,
) -> DistInfo:
    """Start the default process group from the launcher's variables (or a world of one).

    A task that ``srun`` started with no launcher in between gets them from Slurm's (:func:`slurm_launch_env`).
    ``timeout_s`` bounds the wait for the other ranks to join and every later collective.
    """
    from_process = env is None
    env = os.environ if env is None else env
    if slurm := slurm_launch_env(env):  # tasks of `srun -n N` with no launcher in between: one rank each
        if from_process:  # DeepSpeed and the CLI's error line read RANK / LOCAL_RANK from the environment
            os.environ.update(slurm)
        env = {**env, **slurm}
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size == 1 and not need_group:
        return DistInfo(device=device, timeout_s=timeout_s)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if world_size == 1:  # DeepSpeed reads these (LOCAL_RANK above all) when plain `python` set none
            for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", str(local_rank))):
                os.environ.setdefault(key, value)
        timeout = timedelta(seconds=timeout_s)
        set_default_group_timeout(timeout)
        try:
            store = _rendezvous_store(env, rank, world_size, timeout)
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, store=store)
        except dist.DistError as e:
            if not _is_timeout(e):
                raise
            raise PeerTimeoutError(
                f"rank {rank}: the other ranks of the world of {world_size} did not join within "
                f"dist.timeout_s={timeout_s:g} s ({_short(e)})"
            ) from e
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend, timeout_s=timeout_s
    )


def set_default_group_timeout(timeout: timedelta | None) -> None:
    """The timeout of every process group created later without one (None: torch's own, 30 minutes).

    DeepSpeed (and other libraries) call ``new_group(ranks)`` with no timeout; torch then reads these
    module defaults, so setting them here is the one place that reaches those groups too.
    """
    from torch.distributed import constants

    distributed_c10d.default_pg_timeout = timeout or constants.default_pg_timeout
    distributed_c10d.default_pg_nccl_timeout = timeout or constants.default_pg_nccl_timeout


# ---------------------------------------------------------------- no rendezvous open beyond this machine


def _rendezvous_store(env: Mapping[str, str], rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """Where the ranks meet: a world of one has no one to meet (a store in this process, ``HashStore``: no
    socket); then a launcher agent's store (:func:`_generation_store`), or one on the loopback interface
    (:func:`_loopback_store`). None: torch's ``env://`` store. Ranks all on this machine (a world of one, a
    loopback MASTER_ADDR) also get gloo on the loopback interface (:func:`_gloo_on_loopback`)."""
    if world_size == 1 or _loopback(env.get("MASTER_ADDR", "")):
        _gloo_on_loopback()
    if world_size == 1:
        return dist.HashStore()
    return _generation_store(env, rank, world_size, timeout) or _loopback_store(env, rank, world_size, timeout)


def _loopback_store(env: Mapping[str, str], rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """Ranks whose MASTER_ADDR is a loopback address all run on this machine: rank 0 serves their store on that
    address only (torch's own TCP store listens on every interface, whatever MASTER_ADDR says). Otherwise
    None: torch's ``env://`` store, which ranks on other machines must reach."""
    host = env.get("MASTER_ADDR", "")
    if not _loopback(host):
        return None
    port = int(env["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, port))
        server.listen(128)
    except OSError as e:
        server.close()
        raise ValueError(f"MASTER_PORT {port} on {host} cannot be used ({e.strerror}); pick a free one") from e
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=server.detach())


def _loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address written out (127.x.x.x, ::1); names such as ``localhost`` are
    not resolved: one may stand for several addresses, of which a server could listen on only one."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gloo_on_loopback() -> None:
    """Gloo listens on the address this machine's hostname resolves to (often one other machines reach) unless
    GLOO_SOCKET_IFNAME names an interface: for ranks all on this machine, the loopback interface (set in this
    process's environment, as every gloo group made later reads it; a value the user set is kept)."""
    names = {name for _, name in socket.if_nameindex()}
    loopback = next((name for name in ("lo", "lo0") if name in names), None)
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)


# ---------------------------------------------------------------- a store per generation of workers

_HELLO = "dist_coop/hello"  # queue of the nonces of ranks > 0 waiting for their generation's token


def _generation_store(env: Mapping[str, str], rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """The store of this generation of workers under torchrun; elsewhere None (the default ``env://`` init).

    With torchrun's c10d rendezvous the workers share one store, hosted by an agent, that outlives a
    restart (TORCHELASTIC_USE_AGENT_STORE): keys a dead generation wrote (gloo's peer addresses) would be
    read by the next one, which then connects to dead ports. So each generation works under a prefix of
    its own. It cannot come from TORCHELASTIC_RESTART_COUNT: that counts the restarts of one agent, and an
    agent that restarts because another one's worker failed (a membership change) does not count one, so
    two agents disagree on it; MASTER_PORT and TORCHELASTIC_RUN_ID stay the same across restarts. The
    workers agree on a fresh prefix themselves (:func:`_agree_on_generation`).
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_coop/generation/{_agree_on_generation(base, rank, world_size, timeout)}", base)


def _agree_on_generation(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> str:
    """A token every worker of this generation gets, and no worker of an earlier one ever had.

    Rank 0 draws a random token. Every other rank pushes a random nonce of its own on a queue and waits for
    the token under a key named by that nonce, so an answer meant for a dead generation is never read; rank 0
    answers every nonce it finds (stale ones too, harmlessly) until all ranks counted themselves in under
    the token, which only this generation knows. Workers of a new generation start only after the agents
    stopped every worker of the old one, so no old rank 0 answers.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    if rank != 0:
        nonce = uuid.uuid4().hex
        reply = f"dist_coop/reply/{nonce}"
        store.queue_push(_HELLO, nonce)
        try:
            store.wait([reply], timeout)
        except dist.DistError as e:
            raise PeerTimeoutError(
                f"rank {rank}: rank 0 did not answer within dist.timeout_s={timeout.total_seconds():g} s "
                f"while the workers agreed on their generation ({_short(e)})"
            ) from e
        token = store.get(reply).decode()
        store.delete_key(reply)
        store.add(f"dist_coop/generation/{token}/joined", 1)
        return token
    token = uuid.uuid4().hex
    joined = f"dist_coop/generation/{token}/joined"
    while (count := store.add(joined, 0)) < world_size - 1:
        while store.queue_len(_HELLO):
            store.set(f"dist_coop/reply/{store.queue_pop(_HELLO, block=False).decode()}", token)
        if time.monotonic() > deadline:
            raise PeerTimeoutError(
                f"rank 0: {world_size - 1 - count} of the other {world_size - 1} ranks did not arrive within "
                f"dist.timeout_s={timeout.total_seconds():g} s"
            )
        time.sleep(0.02)
    return token


# ---------------------------------------------------------------- failures of peers, in one line

_GLOO_LOCATION = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")


def _short(error: BaseException) -> str:
    """The first line of a torch / gloo error, without the source location gloo puts first."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return _GLOO_LOCATION.sub("", lines[0])


def _is_timeout(error: BaseException) -> bool:
    return "timed out" in str(error).lower() or "timeout" in str(error).lower()


def peer_failure(error: BaseException, rank: int) -> str | None:
    """One line for an error that says another rank is gone or stalled; None for any other error."""
    if isinstance(error, PeerTimeoutError):
        return str(error)
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if _is_timeout(error) and (isinstance(error, dist.DistError) or "gloo" in text or "Watchdog" in text):
        return (
            f"rank {rank}: no answer from the other ranks within dist.timeout_s; a rank is gone or stalled "
            f"({_short(error)})"
        )
    if any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Connection refused")):
        return f"rank {rank}: another rank is gone ({_short(error)})"
    return None


def close_distributed(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()
        set_default_group_timeout(None)


# Deprecations that DeepSpeed 0.19.8 triggers under torch 2.13 and this package does not (tests/test_imports.py
# checks that no module here calls these APIs): its ZeRO stages call the collectives torch now names
# all_gather_single / reduce_scatter_single, and importing it imports torch modules that still use
# torch.jit.script_method. Ignored by message, so every other warning (ours included) still shows or fails
# a run under -W error.
DEEPSPEED_DEPRECATIONS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
)


def ignore_deepspeed_deprecations() -> None:
    """Install the filters of ``DEEPSPEED_DEPRECATIONS`` (process-wide: DeepSpeed warns from every step)."""
    for category, message in DEEPSPEED_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
