"""``dist-coop ui``: the MLflow UI on the store a run logged to; the training job ends by printing the command."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dist_coop import ui
from dist_coop.cli import main, run_training
from dist_coop.config import load_config, save_config
from dist_coop.ports import free_port, port_is_free
from dist_coop.preempt import EXIT_INTERRUPTED
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_until_answers(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dist-coop ui exited with {proc.returncode} before the UI answered"
        try:
            if _get(url)[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


@pytest.mark.slow
def test_training_prints_the_ui_command_and_ui_serves_that_store(tmp_path, fmnist_root, monkeypatch, capsys):
    """A tiny tracked run (out_dir relative to the folder training started in), then ``dist-coop ui RUN_DIR``
    from another folder: the UI answers on the printed address and holds that run; SIGTERM stops it all."""
    started = tmp_path / "started_here"
    started.mkdir()
    monkeypatch.chdir(started)
    overrides = [*TINY, "--train.out_dir=runs", "--train.run_name=r", "--train.max_steps=1"]
    run_training(load_config(None, [*overrides, "--tracking.backend=mlflow", "--data.train_subset=64"]))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"MLflow run (\w+) in (\S+); browse it with: dist-coop ui (\S+)", last)
    assert m, last
    run_id, uri, run_dir = m.groups()
    assert Path(run_dir) == Path("runs/r") and uri == f"sqlite:///{started / 'runs' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the command works from anywhere: the store is found from the run folder
    run_dir = started / run_dir
    assert ui.store_uri(run_dir) == uri == ui.store_uri(started / "runs")  # a run folder or its out_dir
    if ui.installed_mlflow() != "mlflow":
        pytest.skip("the full mlflow package (the 'ui' extra) is not installed")

    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dist_coop.cli", "ui", str(run_dir), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    address = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answers(f"{address}/health", proc, timeout_s=300)  # ~7 s idle, ~30 s on 2 busy cores
        assert f"MLflow UI for {uri} at {address} (starting; Ctrl-C stops it)" in log.read_text().splitlines()
        status, body = _get(f"{address}/api/2.0/mlflow/runs/get?run_id={run_id}")
        assert status == 200, body
        run = json.loads(body)["run"]
        assert run["info"]["run_name"] == "r" and run["info"]["status"] == "FINISHED"
        status, page = _get(f"{address}/")
        assert status == 200 and b"<html" in page  # the UI itself, not only the REST API
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_INTERRUPTED
        assert port_is_free("127.0.0.1", port)  # the server it started is gone too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_folder(tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "out" / "r"
    run_dir.mkdir(parents=True)
    save_config(
        load_config(None, ["--train.out_dir=elsewhere", "--train.run_name=r", *overrides]), run_dir / "config.yaml"
    )
    return run_dir


def test_store_of_a_run_folder_an_out_dir_and_a_configured_uri(tmp_path):
    run_dir = _run_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"logged to sqlite:///.*/out/mlflow.db, but .* does not exist"):
        ui.store_uri(run_dir)  # the run's store is its parent's mlflow.db, wherever train.out_dir pointed
    (tmp_path / "out" / "mlflow.db").touch()
    assert ui.store_uri(run_dir) == ui.store_uri(tmp_path / "out") == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    custom = _run_folder(tmp_path / "c", "--tracking.uri=http://tracking.example:5000")
    assert ui.store_uri(custom) == "http://tracking.example:5000"
    untracked = _run_folder(tmp_path / "n", "--tracking.backend=none")
    with pytest.raises(ValueError, match="was not tracked"):
        ui.store_uri(untracked)
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        ui.store_uri(tmp_path / "missing")


def test_ui_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    run_dir = _run_folder(tmp_path)
    (tmp_path / "out" / "mlflow.db").touch()
    monkeypatch.setattr(ui, "installed_mlflow", lambda: "mlflow-skinny")
    assert main(["ui", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "dist-coop: error: the MLflow UI needs the full mlflow package (only mlflow-skinny is installed): "
        "install the 'ui' extra, pip install -e '.[ui]'"
    )
    monkeypatch.setattr(ui, "installed_mlflow", lambda: "mlflow")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", str(run_dir), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use; pass another with --port" in capsys.readouterr().err


def test_the_ui_extra_is_the_full_mlflow_package_and_the_server_runs_lean():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "mlflow" in extras[ui.UI_EXTRA]
    assert ui.ui_env()["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    line = ui.ui_command_line("sqlite:////x.db", "127.0.0.1", 5000)
    assert line[1:] == [
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        "sqlite:////x.db",
        "--host",
        "127.0.0.1",
        "--port",
        "5000",
        "--workers",
        "1",
    ]


class _FakeServer:
    """What ``ui_command`` starts, recorded instead of run: an MLflow server that exits at once."""

    started: list[list[str]] = []

    def __init__(self, argv, **kwargs):
        _FakeServer.started.append(list(argv))
        self.pid, self.returncode = -1, 0

    def wait(self, timeout=None):
        return 0

    def poll(self):
        return 0


def test_a_ui_on_every_interface_warns_that_it_has_no_authentication(tmp_path, monkeypatch, capsys):
    """``--host 0.0.0.0``: one warning line on stderr naming the host, the default and an SSH tunnel; the
    default host (loopback) warns of nothing. No server starts (its ``Popen`` records the command line)."""
    run_dir = _run_folder(tmp_path)
    (tmp_path / "out" / "mlflow.db").touch()
    monkeypatch.setattr(ui, "installed_mlflow", lambda: "mlflow")
    monkeypatch.setattr(ui.subprocess, "Popen", _FakeServer)
    _FakeServer.started.clear()
    port = free_port()
    assert main(["ui", str(run_dir), "--host", "0.0.0.0", "--port", str(port)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "dist-coop: warning: the MLflow UI has no authentication and --host 0.0.0.0 serves it to every machine "
        "that can reach this one; keep --host 127.0.0.1 (the default) and browse from elsewhere through an SSH "
        f"tunnel: ssh -L {port}:127.0.0.1:{port} <this machine>"
    ]
    assert main(["ui", str(run_dir), "--port", str(port)]) == 0
    assert capsys.readouterr().err == ""
    assert [argv[argv.index("--host") + 1] for argv in _FakeServer.started] == ["0.0.0.0", "127.0.0.1"]
    assert ui.exposure_warning("::1", port) == ui.exposure_warning("localhost", port) == ""
    assert "--host ::" in ui.exposure_warning("::", port)
