"""MLflow tracker: one run per job, default store a SQLite file that ``mlflow ui`` reads.

MLflow metric names may not contain ``@``; ours (``val/acc1/teammate_a@0.25``) are logged as
``val/acc1/teammate_a/depth_0.25``.

Artifacts: a database store (SQLite, PostgreSQL, ...) keeps no files, and MLflow then puts an
experiment's artifacts in ``./mlruns`` of whatever folder the process happened to start in. An
experiment this tracker creates in such a store gets ``artifact_dir`` (``<train.out_dir>/mlartifacts``)
instead. A file store keeps them beside its runs and a tracking server decides itself; both are left
alone, and so is an experiment that already exists (MLflow fixes its location at creation).

Resumes: a resumed job continues the same MLflow run, whose params cannot change. The params stay what
the first launch logged; every resume counts itself in the tag ``resumes`` and records each setting it
changed as the tag ``resume/<n>/<key>`` = ``"<old> -> <new>"`` (old: the value in force before that
resume, i.e. after earlier resumes' changes).
"""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import Any

from dist_coop.track.base import FINISHED

ERROR_TAG, ERROR_TAG_CHARS = "error", 1000
RESUMES_TAG, RESUME_PREFIX, ARROW = "resumes", "resume/", " -> "
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores (+ driver)


def mlflow_key(name: str) -> str:
    return name.replace("@", "/depth_")


def _shown(value: str) -> str:
    return value if value else '""'


def _unshown(value: str) -> str:
    return "" if value == '""' else value


def settings_before_resume(params: dict[str, str], tags: dict[str, str], resume: int) -> dict[str, str]:
    """The settings in force before resume ``resume``: the first launch's params with resumes 1..resume-1 applied."""
    current = dict(params)
    for n in range(1, resume):
        prefix = f"{RESUME_PREFIX}{n}/"
        for tag, value in tags.items():
            if tag.startswith(prefix):
                key = tag[len(prefix) :]
                old = _shown(current.get(key, "")) + ARROW
                new = value[len(old) :] if value.startswith(old) else value.split(ARROW, 1)[-1]
                current[key] = _unshown(new)
    return current


def resume_changes(before: dict[str, str], now: dict[str, str], resume: int) -> dict[str, str]:
    """``{"resume/<n>/<key>": "<old> -> <new>"}`` for every setting of ``now`` that differs from ``before``."""
    return {
        f"{RESUME_PREFIX}{resume}/{key}": f"{_shown(before[key])}{ARROW}{_shown(value)}"
        for key, value in now.items()
        if key in before and before[key] != value
    }


def is_database_uri(uri: str) -> bool:
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    return scheme.split("+", 1)[0] in DATABASE_SCHEMES


class MlflowTracker:
    def __init__(
        self, uri: str, experiment: str, run_name: str, run_id: str = "", *, artifact_dir: str | Path | None = None
    ) -> None:
        """``run_id``: continue that run; ``artifact_dir``: where a new experiment in a database store keeps artifacts."""
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        self._client = mlflow.MlflowClient(uri)
        own_dir = artifact_dir if is_database_uri(uri) else None  # file stores and servers place artifacts
        mlflow.set_experiment(experiment_id=self._experiment_id(experiment, own_dir))
        # how a continued run last ended (FAILED, KILLED, ...); "" for a new run
        self.previous_status = self._client.get_run(run_id).info.status if run_id else ""
        # resume continues the same run (its id is stored in the checkpoint), RUNNING again
        self.run = mlflow.start_run(run_id=run_id or None, run_name=None if run_id else run_name)
        self.run_id: str = self.run.info.run_id
        self.uri = uri
        self.artifact_uri: str = self.run.info.artifact_uri
        self._continued = bool(run_id)

    def _experiment_id(self, name: str, artifact_dir: str | Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = Path(artifact_dir).resolve().as_uri() if artifact_dir is not None else None
        try:
            return self._client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another job created it meanwhile
            found = self._client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        """New keys become params; in a continued run, changed values become ``resume/<n>/<key>`` tags."""
        now = {k: str(v) for k, v in params.items()}
        data = self._client.get_run(self.run_id).data
        fresh = {k: v for k, v in now.items() if k not in data.params}
        if fresh:
            self._mlflow.log_params(fresh)
        if not self._continued:
            return
        self._continued = False  # one record per launch
        resume = int(data.tags.get(RESUMES_TAG, "0")) + 1
        before = settings_before_resume(data.params, data.tags, resume)
        self._mlflow.set_tags({RESUMES_TAG: str(resume), **resume_changes(before, now, resume)})

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
        elif status == FINISHED and ERROR_TAG in self._client.get_run(self.run_id).data.tags:
            self._mlflow.delete_tag(ERROR_TAG)
        self._mlflow.end_run(status=status)


def default_uri(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def artifact_dir(out_dir: str | Path) -> Path:
    """Where a new experiment of a database store keeps its runs' artifacts: ``<out_dir>/mlartifacts``."""
    return Path(out_dir) / "mlartifacts"
