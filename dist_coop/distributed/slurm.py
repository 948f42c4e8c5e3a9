"""Slurm without a launcher: the tasks of ``srun -n N python launch/train.py`` are the N ranks of one run.

``srun`` gives each task SLURM_PROCID, SLURM_LOCALID and the step's task count and node list, but none of
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT that ``init_distributed`` reads; without them each
task would be a world of one, N runs racing for one run folder. :func:`slurm_launch_env` maps the first to
the second (a pure function of the environment); ``launch/slurm/train.sbatch`` runs torchrun under srun instead.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping

SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000  # MASTER_PORT from the job id: below Linux's ephemeral ports (32768+)
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def slurm_launch_env(env: Mapping[str, str], *, use_scontrol: bool = True) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for a task that ``srun`` started with no launcher
    in between; {} for every other process.

    Each task of ``srun -n N python launch/train.py`` is one rank: RANK = SLURM_PROCID, WORLD_SIZE =
    SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), LOCAL_RANK = SLURM_LOCALID. The ranks meet on the loopback address
    when the step has one node, else on its first host (where task 0 runs under srun's block and cyclic
    distributions), on port 10000 + job id mod 20000. MASTER_ADDR and MASTER_PORT set in the environment win.

    {} where a launcher set RANK (torchrun and deepspeed, under srun too), and where no job step started this
    process: the batch script of ``sbatch`` and an ``salloc`` shell carry SLURM_PROCID and SLURM_NTASKS but no
    SLURM_STEP_ID, and are one process whatever SLURM_NTASKS says. Refused in one line (ValueError) when the
    variables do not say who this rank is or where rank 0 is, so that N tasks never start N runs.
    """
    if "RANK" in env or "SLURM_STEP_ID" not in env:
        return {}
    rank, local_rank = _slurm_int(env, "SLURM_PROCID"), _slurm_int(env, "SLURM_LOCALID")
    tasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world_size = _slurm_int(env, tasks_key)
    if not 0 <= rank < world_size:
        raise ValueError(
            f"SLURM_PROCID={rank} is not below {tasks_key}={world_size}; set RANK, WORLD_SIZE and LOCAL_RANK yourself"
        )
    out = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
    if world_size == 1:
        return out
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or _slurm_master(env, use_scontrol)
    if env.get("MASTER_PORT"):
        out["MASTER_PORT"] = env["MASTER_PORT"]
    elif env.get("SLURM_JOB_ID", "").isdigit():
        out["MASTER_PORT"] = str(SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN)
    else:
        raise ValueError("srun started this task but SLURM_JOB_ID is not set; set MASTER_PORT to a free port")
    return out


def _slurm_int(env: Mapping[str, str], key: str) -> int:
    value = env.get(key, "")
    if not value.isdigit():
        raise ValueError(
            f"srun started this task but {key}={value!r} is not a count; set RANK, WORLD_SIZE and LOCAL_RANK "
            "yourself or start the ranks with launch/slurm/train.sbatch"
        )
    return int(value)


def _slurm_master(env: Mapping[str, str], use_scontrol: bool) -> str:
    """Where the step's ranks meet: the loopback address on one node, else the first host of its node list."""
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or ""
    if nodes == "1":
        return "127.0.0.1"
    key = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    nodelist = env.get(key, "")
    host = (_scontrol_first_host(nodelist) if use_scontrol and nodelist else None) or slurm_first_host(nodelist)
    if not host:
        raise ValueError(f"cannot tell the first host of {key}={nodelist!r}; set MASTER_ADDR to the host of task 0")
    return host


def slurm_first_host(nodelist: str) -> str:
    """The first host of a node list in Slurm's compressed form, "" when it is not one:
    ``gpu[03-05,07],cpu1`` -> ``gpu03``, ``rack[1-2]-n[01-04]`` -> ``rack1-n01``, ``a,b`` -> ``a``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            end = i
            break
    host = re.sub(r"\[(\d+)[^\]]*\]", r"\1", nodelist[:end].strip())  # a range's first number keeps its zeros
    return host if _HOST.fullmatch(host) else ""


def _scontrol_first_host(nodelist: str) -> str | None:
    """The first host ``scontrol show hostnames`` expands the node list to; None without scontrol or an answer."""
    try:
        done = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = done.stdout.split() if done.returncode == 0 else []
    return hosts[0] if hosts else None
