"""The tracker interface: the loop logs through it and never asks which backend is on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # how a run ends (MLflow's run statuses)


class TrackingError(OSError):
    """The tracking store failed (its disk full, unreachable, unreadable): one line naming the store."""


class Tracker(Protocol):
    run_id: str  # the backend's id of the run, kept in checkpoints so a resumed job continues it ("": none)
    uri: str  # where the run is stored, for the user to browse ("": nowhere)

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def log_checkpoint(self, folder: str | Path | None) -> None:
        """Record the run's final checkpoint folder as ``tracking.log_checkpoint`` says."""
        ...

    def close(self, status: str = FINISHED, error: str = "") -> None:
        """End the run as ``status``; ``error``: why it did not finish (one line)."""
        ...


def error_line(error: BaseException) -> str:
    """``"NonFiniteError: non-finite loss of ..."``: the exception's type and first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class NullTracker:
    """Logs nothing (tracking off, and every rank but 0)."""

    run_id: str = ""
    uri: str = ""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_checkpoint(self, folder: str | Path | None) -> None:
        pass

    def close(self, status: str = FINISHED, error: str = "") -> None:
        pass
