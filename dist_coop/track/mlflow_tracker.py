"""MLflow tracker: one run per job, default store a SQLite file that ``mlflow ui`` reads.

MLflow metric names may not contain ``@``; ours (``val/acc1/teammate_a@0.25``) are logged as
``val/acc1/teammate_a/depth_0.25``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dist_coop.track.base import FINISHED

ERROR_TAG, ERROR_TAG_CHARS = "error", 1000


def mlflow_key(name: str) -> str:
    return name.replace("@", "/depth_")


class MlflowTracker:
    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str = "") -> None:
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        # how a continued run last ended (FAILED, KILLED, ...); "" for a new run
        self.previous_status = mlflow.get_run(run_id).info.status if run_id else ""
        # resume continues the same run (its id is stored in the checkpoint), RUNNING again
        self.run = mlflow.start_run(run_id=run_id or None, run_name=None if run_id else run_name)
        self.run_id: str = self.run.info.run_id
        self.uri = uri

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self._mlflow.get_run(self.run_id).data.params
        fresh = {k: str(v) for k, v in params.items() if k not in existing}
        if fresh:
            self._mlflow.log_params(fresh)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._mlflow.log_metrics({mlflow_key(k): float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():  # a checkpoint folder: keep its name
            self._mlflow.log_artifacts(str(path), artifact_path=path.name)
        else:
            self._mlflow.log_artifact(str(path))

    def close(self, status: str = FINISHED, error: str = "") -> None:
        """End the run as FINISHED, FAILED or KILLED; ``error`` becomes the tag ``error``.

        A continued run that now finishes loses the tag its last attempt left.
        """
        if error:
            self._mlflow.set_tag(ERROR_TAG, error[:ERROR_TAG_CHARS])
        elif status == FINISHED and ERROR_TAG in self._mlflow.get_run(self.run_id).data.tags:
            self._mlflow.delete_tag(ERROR_TAG)
        self._mlflow.end_run(status=status)


def default_uri(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"
