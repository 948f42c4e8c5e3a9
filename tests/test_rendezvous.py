"""Where the ranks meet listens on this machine only when they all run on it.

Real processes call ``init_distributed`` (gloo), run a collective in the default group and in a group made
afterwards (as DeepSpeed and the placements make theirs), then list their own listening TCP sockets: a world of
one opens no rendezvous store at all, and ranks meeting at a loopback MASTER_ADDR listen on loopback only
(torch's own store listens on every interface). With the machine's hostname set to a non-loopback address
of its own (a UTS namespace, where ``unshare`` may make one), gloo's sockets stay on loopback too.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_coop.distributed.env import init_distributed, set_default_group_timeout
from dist_coop.ports import free_port

psutil = pytest.importorskip("psutil")  # DeepSpeed depends on it

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, psutil, torch, torch.distributed as dist
from dist_coop.distributed.env import close_distributed, init_distributed
info = init_distributed("cpu", backend="gloo", need_group=True, timeout_s=60)
t = torch.ones(1)
dist.all_reduce(t)
dist.all_reduce(t, group=dist.new_group(list(range(info.world_size))))
listening = [list(c.laddr) for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
print(json.dumps({"sum": t.item(), "listening": listening}), flush=True)
dist.barrier()  # every rank listed its sockets while all were up
close_distributed(info)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.pop("MASTER_PORT", None)
    env.pop("GLOO_SOCKET_IFNAME", None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _other_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (None: it has none)."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


def _as_hostname(address: str | None) -> list[str]:
    """The command prefix that runs a program with this machine's hostname set to ``address`` (in a UTS
    namespace of its own); [] for None. Skips the test where no such namespace can be made."""
    if address is None:
        return []
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("no UTS namespace here (unshare --uts needs root and util-linux)")
    return [unshare, "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', address]


def _run(world_size: int, prefix: list[str], env: dict[str, str] | None = None) -> list[dict]:
    procs = [
        subprocess.Popen(
            [*prefix, sys.executable, "-c", CHILD],
            cwd=ROOT,
            env=_env(**(env or {}), **({"RANK": str(r), "LOCAL_RANK": str(r)} if env else {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("hostname", ["as_is", "non_loopback"])
def test_a_world_of_one_listens_on_no_address_beyond_loopback(hostname):
    """Plain ``python`` (no launcher variables): a process group of one (DeepSpeed needs one) over a store in the
    process; the only sockets it listens on are gloo's, on loopback."""
    prefix = _as_hostname(_other_address() if hostname == "non_loopback" else None)
    if hostname == "non_loopback" and not prefix:
        pytest.skip("this machine has no non-loopback IPv4 address")
    (result,) = _run(1, prefix)
    assert result["sum"] == 1.0
    assert all(_is_loopback(ip) for ip, _ in result["listening"]), result["listening"]


@pytest.mark.slow  # starts processes
def test_ranks_meeting_at_a_loopback_address_listen_on_loopback_only():
    """Two ranks, MASTER_ADDR 127.0.0.1 (as the deepspeed launcher on one node sets it): rank 0 serves the store
    at MASTER_PORT on 127.0.0.1, not on every interface."""
    port = free_port()
    results = _run(2, [], {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert [r["sum"] for r in results] == [4.0, 4.0]  # both collectives summed over both ranks
    assert ["127.0.0.1", port] in results[0]["listening"]  # the store
    for r in results:
        assert all(_is_loopback(ip) for ip, _ in r["listening"]), r["listening"]


def test_a_taken_loopback_master_port_is_one_line(monkeypatch):
    """Rank 0 cannot serve the store at MASTER_PORT (another program listens there): one line naming the
    setting, before any group forms."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # what init_distributed would otherwise set in this process
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        try:
            with pytest.raises(
                ValueError, match=rf"^MASTER_PORT {port} on 127.0.0.1 cannot be used \(.+\); pick a free one$"
            ):
                init_distributed("cpu", backend="gloo", need_group=True, timeout_s=5, env=env)
        finally:
            set_default_group_timeout(None)
