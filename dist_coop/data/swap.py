"""A finished shard folder put in place of the old one, so that a crash never leaves half of either.

The shard writer writes into a hidden sibling of its output (``partial_dir``: ``.<name>.partial-<pid>-*``),
flushes every file in it and the folder to disk, then swaps it with the output (``swap_into_place``): in
one atomic step where the file system can exchange two names (Linux ``renameat2(RENAME_EXCHANGE)``),
else in two renames through ``.<name>.old-<pid>``. At every instant the output is the old folder or
the new one, except between those two renames: a writer killed there leaves the output missing and
the old folder aside, and ``recover`` (run by the next writer and by ``read_index``) puts it back.
The next writer also removes the hidden folders of writers that are gone (``remove_stale``). Hidden
folders are never read as shards.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from dist_coop.durable import fsync_dir

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def partial_dir(out_dir: Path) -> Path:
    """A new hidden sibling of ``out_dir`` named for this process."""
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step; False where the system or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_into_place(tmp: Path, out_dir: Path, *, exchange: bool = True) -> None:
    """``tmp`` (complete and on disk) becomes ``out_dir``; an old ``out_dir`` is removed once the new one is in
    place. ``exchange=False`` takes the two-rename way even where one atomic step would do."""
    if out_dir.exists() and exchange and _exchange(tmp, out_dir):
        fsync_dir(out_dir.parent)
        shutil.rmtree(tmp)  # now the old folder
        return
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def set_aside(out_dir: Path, kind: str = "old") -> list[Path]:
    """The ``.<name>.<kind>-<pid>...`` siblings of ``out_dir`` whose writer process is gone, newest first."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.{kind}-(\d+)(-.*)?")
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return []
    found = [p for p in siblings if (m := pattern.fullmatch(p.name)) and p.is_dir() and not _alive(int(m[1]))]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def recover(out_dir: Path) -> bool:
    """Put back the old folder of a writer killed between its two renames (``out_dir`` missing and
    ``.<name>.old-<pid>`` there); True when it did. A folder that cannot be renamed is left for the user."""
    if out_dir.exists():
        return False
    for old in set_aside(out_dir):
        try:
            old.rename(out_dir)
            fsync_dir(out_dir.parent)
            return True
        except OSError:  # a read-only folder, or another process put it back first
            return out_dir.exists()
    return False


def remove_stale(out_dir: Path) -> None:
    """Put back an old folder (``recover``), then remove the partial and old folders that writers of
    ``out_dir`` which are gone left beside it."""
    recover(out_dir)
    for kind in ("partial", "old"):
        for p in set_aside(out_dir, kind):
            shutil.rmtree(p, ignore_errors=True)


def tree_bytes(folder: Path | None) -> int:
    """The bytes of the files directly in ``folder`` (0 when there is none)."""
    try:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder else 0
    except OSError:
        return 0
