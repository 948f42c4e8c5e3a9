"""One run per run folder: a lock held for the run's life by the process that writes the folder.

Two runs in one folder would mix their files (one run's nets beside the other's trainer state) and race on the
``latest`` pointer. The lock is an exclusive ``flock`` on ``<run>/.lock``, which the kernel releases when the
holder exits however it exits (SIGKILL and the OOM killer included); the file names the holder (host, pid, start
time) so that a refused run can say who holds it. A lock file that names a holder but is not locked was left by a
process that is gone: it is taken over, with a warning. A multi-rank run holds one lock, on the rank that writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderBusy(ValueError):
    """Another live process holds the run folder."""


class RunLock:
    """``with RunLock(folder) as lock:`` holds ``folder`` for this process; ``lock.taken_over`` names the holder
    of a lock left by a process that is gone ("" when the folder was free)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.taken_over = ""
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {self.folder} is in use by another run ({holder}); wait for it to end, or give this "
                "run another --train.run_name"
            ) from None
        left = _read(fd)
        if left:
            self.taken_over = _describe(left)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock and leave the file empty: a free folder names no holder."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {"host": "?", "pid": "?", "since": "?"}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that did not name itself"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"
