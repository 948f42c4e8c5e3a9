"""``dist-coop ui [RUN_DIR]``: the MLflow UI on the tracking store a run logged to, in one step.

The store is found as training chose it (``dist_coop.track.build_tracker``): ``tracking.uri`` from the
run's ``config.yaml``, else ``sqlite:///<train.out_dir>/mlflow.db``, where ``train.out_dir`` is the run
folder's parent (a run folder is ``<out_dir>/<run_name>``, so this holds wherever training was started).
An output folder holding ``mlflow.db`` works too. The server is started the way that is healthy on a
small machine (~480 MB and 7 s instead of ~13 processes and 3 GB): local host only, one
worker, MLflow's job execution off (an environment variable: ``mlflow ui`` has no flag for it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from dist_coop.config import TrainConfig, config_from_dict
from dist_coop.ports import port_is_free

UI_EXTRA = "ui"  # pyproject.toml's optional dependencies holding the full mlflow package
STORE_FILE = "mlflow.db"


def add_parser(sub, parents: list[argparse.ArgumentParser] | None = None) -> None:
    p = sub.add_parser(
        "ui",
        parents=parents or [],
        help="browse a run's MLflow tracking store in the MLflow UI (needs the full mlflow package)",
    )
    p.add_argument(
        "run",
        nargs="?",
        default=TrainConfig().out_dir,
        help="a run folder (<out_dir>/<run_name>) or an output folder holding mlflow.db (default: %(default)s)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=5000)


def store_uri(path: str | Path) -> str:
    """The tracking URI the run (or output folder) at ``path`` logged to; ValueError if it was not tracked."""
    from dist_coop.track.mlflow_tracker import default_uri

    folder = Path(path)
    if (folder / "config.yaml").is_file():
        cfg = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
        if cfg.tracking.backend == "none":
            raise ValueError(f"{folder} was not tracked (tracking.backend: none): it has no MLflow store")
        uri = cfg.tracking.uri or default_uri(folder.resolve().parent)
    elif (folder / STORE_FILE).is_file():
        uri = default_uri(folder)
    else:
        raise FileNotFoundError(
            f"{folder} is neither a run folder (with config.yaml) nor an output folder with {STORE_FILE}"
        )
    database = _sqlite_file(uri)
    if database is not None and not database.is_file():
        raise FileNotFoundError(f"{folder} logged to {uri}, but {database} does not exist")
    return uri


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and an in-memory database)."""
    prefix = "sqlite:///"  # then an absolute path (sqlite:////abs/x.db) or one relative to the working folder
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix) :].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def installed_mlflow() -> str:
    """Which MLflow distribution is installed: ``mlflow`` (has the UI), ``mlflow-skinny`` (no server) or ``""``."""
    for name in ("mlflow", "mlflow-skinny"):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return name
    return ""


def ui_command_line(uri: str, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def ui_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def address(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def exposure_warning(host: str, port: int) -> str:
    """One line for a ``--host`` other than this machine's loopback (empty for one): MLflow's UI has no
    authentication, so whoever reaches that address can read every run in the store, and change it."""
    try:
        local = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        local = host == "localhost"
    if local:
        return ""
    return (
        f"dist-coop: warning: the MLflow UI has no authentication and --host {host} serves it to every machine "
        f"that can reach this one; keep --host 127.0.0.1 (the default) and browse from elsewhere through an SSH "
        f"tunnel: ssh -L {port}:127.0.0.1:{port} <this machine>"
    )


def ui_command(args: argparse.Namespace) -> int:
    """Start the UI and wait for it; Ctrl-C or SIGTERM stops it (and every process it started)."""
    uri = store_uri(args.run)
    installed = installed_mlflow()
    if installed != "mlflow":
        have = f"only {installed} is installed" if installed else "no mlflow package is installed"
        raise ValueError(
            f"the MLflow UI needs the full mlflow package ({have}): install the {UI_EXTRA!r} extra, "
            f"pip install -e '.[{UI_EXTRA}]'"
        )
    if not port_is_free(args.host, args.port):
        raise ValueError(f"port {args.port} on {args.host} is in use; pass another with --port")
    warning = exposure_warning(args.host, args.port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    server = subprocess.Popen(ui_command_line(uri, args.host, args.port), env=ui_env(), start_new_session=True)
    print(f"MLflow UI for {uri} at {address(args.host, args.port)} (starting; Ctrl-C stops it)", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # the server is in its own session: stop it on SIGTERM too
    try:
        return server.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(server)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop(server: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the server (MLflow forwards it to its web server), then kill its process group if it lingers."""
    if server.poll() is None:
        server.terminate()
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
        server.wait()
