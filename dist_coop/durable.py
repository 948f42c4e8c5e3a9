"""Writes that survive a crash or a power cut, and a full disk said in one line.

A rename is durable only once the folder holding it is flushed, and a file only once its own data is:
``fsync_tree`` flushes every file and folder below a checkpoint before the ``latest`` pointer moves to it,
``atomic_write_text`` writes a small file (the pointer) to a temporary name, flushes it, renames it over the
target and flushes the folder. A full disk (``ENOSPC``, ``EDQUOT``) is recognised by ``is_disk_full`` and named
with the file system and its free space by ``disk_full_line``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (the renames and creations in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush one file's data to disk (it may have been written by another library, or another process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder below ``folder``, then ``folder`` and its parent (where it was created).

    Other ranks may be writing into the same folder meanwhile: a file that is gone by the time it is opened (a
    temporary file its writer renamed) is passed over; its writer flushes what it renamed it to."""
    folder = Path(folder)
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                fsync_file(Path(root) / name)
        fsync_dir(root)
    fsync_dir(folder.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, at every instant and after a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def error_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and what it was raised from or during, outermost first."""
    out: list[BaseException] = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def is_disk_full(error: BaseException) -> bool:
    """Is ``error`` (or what it was raised from) a full disk or an exhausted quota?"""
    for e in error_chain(error):
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        if "No space left on device" in str(e):  # torch.save reports the C++ writer's failure as a RuntimeError
            return True
    return False


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def describe_mount(path: str | Path) -> str:
    """``/mnt/data (tmpfs)``: the mount point holding ``path`` and its file system type, where known."""
    mount = mount_point(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[1].replace("\\040", " ") == str(mount):
                return f"{mount} ({fields[2]})"
    return str(mount)


def disk_full_line(path: str | Path) -> str:
    """``the disk at /mnt/runs (3.0 MB, 0.0 MB free)``: which file system is full and how full."""
    mount = mount_point(path)
    usage = shutil.disk_usage(mount)
    return f"the disk at {mount} ({usage.total / 1e6:.1f} MB, {usage.free / 1e6:.1f} MB free)"


class DiskFullError(RuntimeError):
    """A write that a full disk stopped, said in one line (which file system, what was kept, what to do)."""
