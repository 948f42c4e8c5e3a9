"""The MLflow store under faults: concurrent starts on one SQLite file, and errors said in one line.

Concurrent starts: MLflow creates and migrates a SQLite store's tables the first time a process opens it, with
no lock, so two jobs started together on one ``mlflow.db`` race in alembic's migrations and one of them dies
("Online migration expected to match one row ..."). ``store_lock`` serialises opening: an exclusive ``flock`` on
``<db>.lock`` beside the file, held while the store is opened (tables created or upgraded) and the experiment is
found or made. Later writes of several jobs to one file need no lock of ours: MLflow gives every SQLite session a
busy timeout of 20 s (``PRAGMA busy_timeout``), so a writer waits for another's transaction instead of failing
with "database is locked".

Errors: a store that fails (its disk full, the file unreadable, a server gone) raises ``TrackingError``, one line
naming the store and what went wrong (for a full disk: the disk and its free bytes), with MLflow's exception
chained for ``--debug``; MLflow's own logged traceback of the same SQLAlchemy error is not printed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sqlite3
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from dist_coop.durable import DISK_FULL, describe_mount, error_chain
from dist_coop.track.base import TrackingError, error_line

LOCK_SUFFIX = ".lock"
MLFLOW_DB_LOGGER = "mlflow.store.db.utils"  # logs every SQLAlchemy error with its traceback before raising it


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store; None for other stores and in-memory SQLite."""
    if urllib.parse.urlparse(uri).scheme.lower().split("+", 1)[0] != "sqlite":
        return None
    import sqlalchemy

    database = sqlalchemy.engine.make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>.lock`` (exclusive ``flock``) for a SQLite store; nothing for other stores."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.with_name(db.name + LOCK_SUFFIX), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, or by the kernel if this process dies
        yield
    finally:
        os.close(fd)


class _DropLoggedStoreErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


_FILTER = _DropLoggedStoreErrors()


def quiet_store_errors() -> None:
    """Stop MLflow logging a store error's traceback (``store_errors`` reports it in one line) and its progress notes
    on the tables (idempotent)."""
    logger = logging.getLogger(MLFLOW_DB_LOGGER)
    logger.setLevel(logging.WARNING)  # not its INFO lines on creating or upgrading the tables either
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def describe_disk(path: Path) -> str:
    """``"the disk of /x/mlflow.db, /x (tmpfs), 0 bytes free"``."""
    where = describe_mount(path)
    with contextlib.suppress(OSError):
        probe = path if path.exists() else path.parent
        return f"the disk of {path}, {where}, {shutil.disk_usage(probe).free} bytes free"
    return f"the disk of {path}, {where}"


def _full_disk(uri: str, chain: list[BaseException], files: Path | None) -> str:
    """The disk a "disk full" error in ``chain`` is about, described; "" when it is not one. ``files``: the
    folder being written beside the store (artifacts), for a failed write that names no file."""
    for e in chain:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            # a copy names its source first and its destination second; the folder written beats the source
            named = e.filename2 or (None if files else e.filename)
            path = Path(named) if named else files or sqlite_path(uri)
            return describe_disk(path) if path is not None else "its disk"
        if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            db = sqlite_path(uri)
            return describe_disk(db) if db is not None else "its disk"
    return ""


def store_error(uri: str, doing: str, error: BaseException, files: Path | None = None) -> TrackingError:
    """The one-line ``TrackingError`` for ``error``, raised by the store ``uri`` while ``doing`` (writing
    ``files`` too, if given)."""
    chain = error_chain(error)
    full = _full_disk(uri, chain, files)
    if full:
        return TrackingError(
            f"MLflow store {uri}: could not {doing}: {full} is full; free space there, or set tracking.uri to a "
            "store on another disk (tracking.backend: none to train without tracking)"
        )
    return TrackingError(f"MLflow store {uri}: could not {doing}: {error_line(chain[-1])}")


@contextlib.contextmanager
def store_errors(uri: str, doing: str, files: Path | None = None) -> Iterator[None]:
    """Raise what the store (or the artifact copy into ``files``) raises while ``doing`` as a one-line
    ``TrackingError``."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    try:
        yield
    except TrackingError:
        raise
    except (MlflowException, OSError, sqlite3.Error, sqlalchemy.exc.SQLAlchemyError) as e:
        raise store_error(uri, doing, e, files) from e
