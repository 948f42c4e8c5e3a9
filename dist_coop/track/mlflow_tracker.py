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

Attempts: launch ``n`` of a run (``n`` = resumes before it + 1) is attempt ``n``. A resume records how the
attempt before it ended: ``attempt/<n>/status`` (and ``attempt/<n>/error``, the ``error`` tag it left, which a
finished run loses). An attempt killed outright (SIGKILL, the OOM killer, a machine gone) leaves its run
``RUNNING``; whoever reopens such a run and finds its owner gone records the truth: ``attempt/<n>/status`` =
``KILLED``, ``attempt/<n>/found_unclosed`` (when, by which command) and ``error`` = ``Unclosed: ...``. The owner
is the process that trains the run, named by the tags ``dist_coop.host``, ``dist_coop.pid`` and
``dist_coop.pid_start`` (its start time, so a reused pid is not taken for it); a resume's owner is gone by
definition (it reuses the checkpoints), another command checks the pid on this host. Only a resume sets a run
``RUNNING`` again and ends it; ``add_to_run`` (``dist-coop profile``) logs beside a run and leaves its status as
it found it, except a ``RUNNING`` run whose owner is gone, which it marks ``KILLED``. An owner on another host
cannot be checked: its run is left ``RUNNING``.

Checkpoints (``tracking.log_checkpoint``): the final checkpoint folder stays in the run folder, under
``dist.keep_checkpoints``. ``reference`` (default) logs its absolute path as the tag ``checkpoint`` and the
artifact ``checkpoint.txt``; ``weights`` logs the tag and each net's weights once, ``weights/<net>.pt``
(``{"module": state_dict}``, whatever the engine; no optimizer state), replaced by a resume's final weights;
``none`` logs nothing.

A store that fails (a full disk above all) raises ``TrackingError`` in one line (``dist_coop.track.store``). A
failure mid-run stops the run: training on without a record would lose what the record is for, and stopping
loses nothing that a resume cannot redo. The last checkpoint stays; once the disk has room, ``--train.resume=auto``
continues the same MLflow run (the killed attempt recorded as above, since a full store cannot close it).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_coop.choices import CHECKPOINT_MODES
from dist_coop.track.base import FINISHED, KILLED
from dist_coop.track.store import quiet_store_errors, store_errors, store_lock

ERROR_TAG, ERROR_TAG_CHARS = "error", 1000
RESUMES_TAG, RESUME_PREFIX, ARROW = "resumes", "resume/", " -> "
RUNNING, ATTEMPT_PREFIX = "RUNNING", "attempt/"
HOST_TAG, PID_TAG, PID_START_TAG = "dist_coop.host", "dist_coop.pid", "dist_coop.pid_start"
CHECKPOINT_TAG, CHECKPOINT_FILE, WEIGHTS_DIR = "checkpoint", "checkpoint.txt", "weights"
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


# ---------------------------------------------------------------- the run's owner and its attempts


def _proc_stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` from its third field (state) on; [] where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def owner_tags() -> dict[str, str]:
    """The tags naming this process as the run's owner."""
    stat = _proc_stat(os.getpid())
    start = stat[19] if len(stat) > 19 else ""  # field 22: start time, in clock ticks after boot
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: start}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Is the process the run's tags name as its owner alive? None: unknown (another host, or none named)."""
    host, pid = tags.get(HOST_TAG, ""), tags.get(PID_TAG, "")
    if not host or not pid.isdigit() or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    stat = _proc_stat(int(pid))
    if not stat:
        return True
    if stat[0] in ("Z", "X"):  # exited, not yet reaped
        return False
    start = tags.get(PID_START_TAG, "")
    return not start or len(stat) <= 19 or stat[19] == start  # another start time: the pid was reused


def _attempt(tags: dict[str, str]) -> int:
    """The number of the run's latest attempt (launch): resumes so far + 1."""
    return int(tags.get(RESUMES_TAG, "0")) + 1


def unclosed_tags(tags: dict[str, str], by: str) -> dict[str, str]:
    """The tags saying that the run's latest attempt ended without closing it (found now, by ``by``)."""
    n = _attempt(tags)
    who = f"process {tags.get(PID_TAG, '?')} on {tags.get(HOST_TAG, '?')}"
    error = f"Unclosed: {who} ended without closing the run (SIGKILL, out of memory or its machine down)"
    found = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by {by}"
    return {
        f"{ATTEMPT_PREFIX}{n}/status": KILLED,
        f"{ATTEMPT_PREFIX}{n}/found_unclosed": found,
        f"{ATTEMPT_PREFIX}{n}/error": error,
        ERROR_TAG: error,
    }


def ended_attempt_tags(status: str, tags: dict[str, str]) -> dict[str, str]:
    """How the run's latest attempt ended, for a resume to record: ``attempt/<n>/status`` (+ ``/error``)."""
    if status == RUNNING:
        return unclosed_tags(tags, "a resume")
    n = _attempt(tags)
    out = {f"{ATTEMPT_PREFIX}{n}/status": status}
    if ERROR_TAG in tags:
        out[f"{ATTEMPT_PREFIX}{n}/error"] = tags[ERROR_TAG]
    return out


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` of ``uri``, its store created or upgraded under ``store_lock``."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    quiet_store_errors()
    with store_errors(uri, "open the store"), store_lock(uri):
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tables exist, whatever MLflow opens lazily
    return client


class MlflowTracker:
    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        run_id: str = "",
        *,
        artifact_dir: str | Path | None = None,
        log_checkpoint: str = "reference",
    ) -> None:
        """``run_id``: continue that run; ``artifact_dir``: where a new experiment in a database store keeps
        artifacts; ``log_checkpoint``: ``tracking.log_checkpoint``."""
        import mlflow

        if log_checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"tracking.log_checkpoint must be one of {list(CHECKPOINT_MODES)}, got {log_checkpoint!r}")
        self._mlflow = mlflow
        self.uri = uri
        self._checkpoint_mode = log_checkpoint
        mlflow.set_tracking_uri(uri)
        self._client = open_client(uri)
        own_dir = artifact_dir if is_database_uri(uri) else None  # file stores and servers place artifacts
        with store_errors(uri, f"open experiment {experiment!r}"), store_lock(uri):
            mlflow.set_experiment(experiment_id=self._experiment_id(experiment, own_dir))
        with store_errors(uri, f"continue run {run_id}" if run_id else "start a run"):
            # how a continued run's last attempt ended (FAILED, KILLED, RUNNING if unclosed, ...); "" for a new run
            previous = self._client.get_run(run_id) if run_id else None
            self.previous_status = previous.info.status if previous is not None else ""
            if previous is not None:
                self._set_tags(run_id, ended_attempt_tags(self.previous_status, previous.data.tags))
            # resume continues the same run (its id is stored in the checkpoint), RUNNING again
            self.run = mlflow.start_run(run_id=run_id or None, run_name=None if run_id else run_name)
            self.run_id: str = self.run.info.run_id
            self._set_tags(self.run_id, owner_tags())
        self.artifact_uri: str = self.run.info.artifact_uri
        self._continued = bool(run_id)

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _store(self, doing: str, files: bool = False):
        """``files``: the artifacts are written too (a full disk there is named)."""
        return store_errors(self.uri, doing, local_path(self.artifact_uri) if files else None)

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
        with self._store("log params"):
            self._log_params(params)

    def _log_params(self, params: dict[str, Any]) -> None:
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
        with self._store(f"log the metrics of step {step}"):
            self._mlflow.log_metrics({mlflow_key(k): float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        with self._store(f"log the artifact {path.name}", files=True):
            if path.is_dir():  # a folder: keep its name
                self._mlflow.log_artifacts(str(path), artifact_path=path.name)
            else:
                self._mlflow.log_artifact(str(path))

    def log_checkpoint(self, folder: str | Path | None) -> None:
        """The final checkpoint ``folder`` as ``tracking.log_checkpoint`` says (module docstring)."""
        if folder is None or self._checkpoint_mode == "none":
            return
        folder = Path(folder).resolve()
        with self._store(f"log the checkpoint {folder.name}", files=True):
            self._mlflow.set_tag(CHECKPOINT_TAG, str(folder))
            # written beside the run's files (its disk has room for checkpoints), then copied by MLflow
            with tempfile.TemporaryDirectory(prefix=".mlflow-", dir=folder.parent.parent) as tmp:
                if self._checkpoint_mode == "reference":
                    (Path(tmp) / CHECKPOINT_FILE).write_text(f"{folder}\n")
                    self._mlflow.log_artifact(str(Path(tmp) / CHECKPOINT_FILE))
                else:
                    write_weights(folder, Path(tmp))
                    self._mlflow.log_artifacts(tmp, artifact_path=WEIGHTS_DIR)

    def close(self, status: str = FINISHED, error: str = "") -> None:
        """End the run as FINISHED, FAILED or KILLED; ``error`` becomes the tag ``error``.

        A continued run that now finishes loses the tag its last attempt left. The run is always let go of
        here, even when the store fails, so that MLflow's exit hook cannot end it FINISHED later.
        """
        with self._store(f"close the run as {status}"):
            try:
                if error:
                    self._mlflow.set_tag(ERROR_TAG, error[:ERROR_TAG_CHARS])
                elif status == FINISHED and ERROR_TAG in self._client.get_run(self.run_id).data.tags:
                    self._mlflow.delete_tag(ERROR_TAG)
            finally:
                self._mlflow.end_run(status=status)


def write_weights(checkpoint: Path, out: Path) -> list[Path]:
    """``<out>/<net>.pt`` = ``{"module": state_dict}`` for every net of ``checkpoint``, read the way inference
    reads it (the torch engine's file or DeepSpeed's module states, ZeRO-3 gathered): weights and buffers only."""
    from dist_coop.checkpoint import TrainerState, net_state_dict, save_checkpoint
    from dist_coop.config import config_from_dict
    from dist_coop.coop.task import build_task

    cfg = config_from_dict(TrainerState.load(checkpoint).config)
    return [
        save_checkpoint({"module": net_state_dict(checkpoint, spec.name, cfg.dist.engine)}, out / f"{spec.name}.pt")
        for spec in build_task(cfg.coop).specs
    ]


def add_to_run(
    uri: str, run_id: str, *, step: int, metrics: dict[str, float], artifacts: Sequence[str | Path], by: str
) -> tuple[str, str]:
    """Log ``metrics`` (at ``step``) and ``artifacts`` to the existing run ``run_id`` without taking it over:
    its status stays as found, except that a RUNNING run whose owner is gone becomes KILLED (module docstring);
    ``by``: the command, for the record. Returns the run's status as found and as left."""
    from mlflow.entities import Metric, RunTag

    client = open_client(uri)
    with store_errors(uri, f"add to run {run_id}"):
        run = client.get_run(run_id)
        found = status = run.info.status
        if status == RUNNING and owner_alive(run.data.tags) is False:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in unclosed_tags(run.data.tags, by).items()])
            client.set_terminated(run_id, KILLED)
            status = KILLED
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
    return found, status


def local_path(uri: str) -> Path | None:
    """The folder of a ``file:`` (or plain path) artifact location; None for remote ones."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    return Path(uri) if not parsed.scheme else None


def default_uri(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def artifact_dir(out_dir: str | Path) -> Path:
    """Where a new experiment of a database store keeps its runs' artifacts: ``<out_dir>/mlartifacts``."""
    return Path(out_dir) / "mlartifacts"
