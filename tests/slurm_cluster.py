"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd of its own, started as root.

Everything lives in one temporary folder: the munge key and socket, slurm.conf (this host as controller and
node, ports nobody listens on, a random first job id so that ports derived from job ids differ between
clusters), the spool and state folders and the logs. The system's /etc/munge and /etc/slurm are not touched;
clients find the cluster through SLURM_CONF in ``Cluster.env``. Two slurmd on one host do not work, so the
cluster has one node.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from dist_coop.ports import free_port

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # slurmctld, slurmd, munged
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "salloc", "scancel", "scontrol", "sinfo", "squeue")


class SlurmUnavailable(Exception):
    """This machine cannot run the cluster (not installed, not root, a daemon did not come up)."""


class Cluster:
    """A started cluster: ``env`` for its clients, and the few queries the tests make."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not an enclosing job's
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(key, None)
        self.env.update(SLURM_CONF=str(root / "slurm.conf"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def run(self, *cmd: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: str, states: set[str], timeout: float = 120) -> dict[str, str]:
        """The job's record once its JobState is one of ``states``."""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id)).get("JobState") not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job.get('JobState')} after {timeout} s: {job}")
            time.sleep(0.1)
        return job

    def logs(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted((self.root / "log").glob("*.log")))

    # ---------------------------------------------------------------- start and stop

    def start(self) -> None:
        for folder in ("munge", "spool", "state", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o755)  # munged wants its socket's folder reachable by all
        socket_path = self.root / "munge" / "socket"
        self._daemon(
            "munged",
            "--foreground",
            "--force",
            f"--socket={socket_path}",
            f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'seed'}",
        )
        self._until(socket_path.exists, "munged made no socket")
        conf = self.root / "slurm.conf"
        conf.write_text(slurm_conf(self.root, socket_path))
        self._daemon("slurmctld", "-D", "-f", str(conf))
        self._daemon("slurmd", "-D", "-f", str(conf))
        self._until(lambda: self.run("sinfo", "-h", "-o", "%T", timeout=20).stdout.strip() == "idle", "no idle node")

    def stop(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", timeout=20).stdout.split() if self.procs else []
        if jobs:
            self.run("scancel", *jobs, timeout=20)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 (the daemon writes to it while it runs)
        self.procs.append(subprocess.Popen([shutil.which(name, path=SBIN), *args], stdout=log, stderr=log))

    def _until(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SlurmUnavailable(f"{what} ({', '.join(dead) or 'timeout'} ) {self.logs()}")
            time.sleep(0.2)


def slurm_conf(root: Path, munge_socket: Path) -> str:
    """One host as controller and node; no cgroup plugins (slurmd fails on them in a container)."""
    host = socket.gethostname()
    return f"""\
ClusterName=distcoop
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
FirstJobId={random.randrange(1000, 1_000_000)}
SlurmdSpoolDir={root / "spool"}
StateSaveLocation={root / "state"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={host} CPUs={os.cpu_count() or 2} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str:
    """Why this machine cannot start the cluster ("" when it can try)."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=SBIN) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found; scripts/setup.sh installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "a Slurm cluster of the tests' own needs root"
    return ""


def installable() -> bool:
    """Where scripts/setup.sh installs Slurm (root and apt-get): there a missing Slurm fails the tests in CI."""
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def cluster(root: Path) -> Iterator[Cluster]:
    """Start a cluster in ``root``, yield it, stop it (raises SlurmUnavailable when it cannot run here)."""
    if why := missing():
        raise SlurmUnavailable(why)
    found = Cluster(root)
    try:
        found.start()
        yield found
    finally:
        found.stop()
