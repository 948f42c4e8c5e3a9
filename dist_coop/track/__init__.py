"""Experiment tracking behind a small interface (``Tracker``), with a null implementation."""

from __future__ import annotations

from pathlib import Path

from dist_coop.config import TrackingConfig
from dist_coop.track.base import FAILED, FINISHED, KILLED, NullTracker, Tracker, TrackingError, error_line


def build_tracker(
    cfg: TrackingConfig, *, run_name: str, out_dir: str | Path, run_id: str = "", enabled: bool = True
) -> Tracker:
    """The tracker for ``cfg``; ``enabled=False`` (ranks other than 0) gives a null one."""
    if not enabled or cfg.backend == "none":
        return NullTracker()
    from dist_coop.track.mlflow_tracker import MlflowTracker, artifact_dir, default_uri

    uri = cfg.uri or default_uri(out_dir)
    return MlflowTracker(
        uri, cfg.experiment, run_name, run_id, artifact_dir=artifact_dir(out_dir), log_checkpoint=cfg.log_checkpoint
    )


__all__ = ["FAILED", "FINISHED", "KILLED", "NullTracker", "Tracker", "TrackingError", "build_tracker", "error_line"]
