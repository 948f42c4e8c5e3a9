"""Preemption: SIGTERM (what Slurm and Kubernetes send before they kill) stops training at a step boundary.

The handler only sets a flag. The trainer reads it once per step in the step guard's tensor, which
is summed over ranks, so every rank stops after the same step; it then saves a checkpoint and raises
``Preempted``, and the command exits with ``EXIT_PREEMPTED``. ``--train.resume=auto`` continues from
that checkpoint as if nothing happened. A repeated SIGTERM does not force anything: Slurm may signal
the workers and the launcher, which forwards it again.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143: what a shell and Slurm report for a process ended by SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: Ctrl-C


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``--train.resume=auto`` continues it."""


def interrupted(error: BaseException) -> bool:
    """Stopped from outside (a stop signal or Ctrl-C) rather than failed."""
    return isinstance(error, (Preempted, KeyboardInterrupt))


class StopSignal:
    """A context that turns SIGTERM into a flag (``received``: the signal's name, "" until one arrives).

    Python runs signal handlers in the main thread only; elsewhere the context installs nothing.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received = ""
        self._previous: dict[signal.Signals, object] = {}

    def requested(self) -> bool:
        return bool(self.received)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
