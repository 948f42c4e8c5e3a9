"""A user's mistakes on the command line: one line on stderr naming what is wrong,
exit code 2, no traceback (``--debug`` adds it).

Every case runs the installed ``dist-coop`` command in its own process, on real files: YAML files with
syntax errors, media made by the real ffmpeg (an audio-only file, a file that is no video), a folder
given as an export target, and a run folder trained here for a few steps.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY

pytestmark = pytest.mark.slow  # every case launches the command in a process of its own

ROOT = Path(__file__).resolve().parents[1]
DIST_COOP = Path(sys.executable).parent / "dist-coop"


def dist_coop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DIST_COOP), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a user error prints; fails when there is more (a traceback) or the exit code is not 2."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("dist-coop: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fmnist_root) -> Path:
    """A real run folder (two training steps of the tiny config): the errors below are not about it."""
    from dist_coop.cli import run_training
    from dist_coop.config import load_config

    out = tmp_path_factory.mktemp("runs")
    run_training(load_config(None, [*TINY, f"--train.out_dir={out}", "--train.run_name=r", "--train.max_steps=2"]))
    return out / "r"


# ---------------------------------------------------------------- configuration


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  name: resnet20\n  width: [4\ntrain:\n  epochs: 2\n")
    line = error_line(dist_coop("train", "--config", str(path)))
    # the flow sequence opened on line 3 is broken where the parser meets 'train:' on line 4
    assert f"YAML error in {path}, line 4, column 6:" in line
    assert "flow sequence started at line 3, column 10" in line
    path.write_text("model:\n  width: 4\n   name: x\n")
    assert f"YAML error in {path}, line 3, column 8: mapping values are not allowed here" in error_line(
        dist_coop("train", "--config", str(path))
    )


def test_override_that_does_not_parse_names_it():
    line = error_line(dist_coop("train", "--model.width=[4"))
    assert "override --model.width=[4 does not parse as a YAML value" in line
    assert "expected ',' or ']'" in line and "column 3 of '[4'" in line


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--train.device=tpu", "train.device must be one of auto, cpu, cuda, cuda:N (N: a GPU index), got 'tpu'"),
        ("--train.device=cuda:first", "train.device must be one of auto, cpu, cuda, cuda:N"),
    ],
)
def test_device_that_does_not_exist_names_the_choices(tmp_path, override, expected):
    assert expected in error_line(dist_coop("train", *TINY, f"--train.out_dir={tmp_path}", override))
    assert not (tmp_path / "train").exists()


def test_cuda_device_that_is_not_present(tmp_path):
    """``cuda`` without a GPU says none is present; on a GPU machine an index past the last GPU is refused."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device, expected = (
        ("cuda", "train.device is 'cuda' but no CUDA GPU is present on this machine")
        if count == 0
        else (f"cuda:{count}", f"train.device is 'cuda:{count}' but this machine has {count} CUDA GPU(s)")
    )
    assert expected in error_line(dist_coop("train", *TINY, f"--train.out_dir={tmp_path}", f"--train.device={device}"))
    assert not any(tmp_path.iterdir()), "nothing is written before the device is known to be there"


def test_inference_device_is_checked_too(run_dir):
    line = error_line(dist_coop("eval", str(run_dir), "--device", "tpu"))
    assert "--device must be one of auto, cpu, cuda, cuda:N" in line and "'tpu'" in line


# ---------------------------------------------------------------- stream and export


def _audio_only(path: Path) -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg binary not installed (apt-get install ffmpeg)")
    cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1", str(path)]
    subprocess.run(cmd, check=True)
    return path


def test_stream_names_the_file_and_why(run_dir, tmp_path):
    stream = ("--run", str(run_dir), "--target-ms", "100", "--no-pace")
    missing = tmp_path / "nope.mp4"
    assert error_line(dist_coop("stream", str(missing), *stream)) == f"dist-coop: error: video not found: {missing}"

    text = tmp_path / "notes.mp4"
    text.write_text("these are notes, not a video\n")
    line = error_line(dist_coop("stream", str(text), *stream))
    assert line.startswith(f"dist-coop: error: {text} is not a video ffmpeg can read: ")
    assert "Invalid data" in line  # ffprobe's own reason

    audio = _audio_only(tmp_path / "tone.m4a")
    line = error_line(dist_coop("stream", str(audio), *stream))
    assert line == f"dist-coop: error: {audio} has no video stream (it holds audio): stream needs a video file"


def test_export_out_pointing_at_a_folder(run_dir, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    line = error_line(dist_coop("export", str(run_dir), "--depth", "0.5", "--out", str(folder)))
    assert (
        line
        == f"dist-coop: error: --out {folder} is a folder; give the file to write, e.g. {folder}/teammate_a_0.5.pt2"
    )
    assert not any(folder.iterdir())
    line = error_line(
        dist_coop("export", str(run_dir), "--depth", "0.5", "--format", "onnx", "--out", f"{tmp_path}/new/")
    )
    assert "is a folder" in line and "teammate_a_0.5.onnx" in line and not (tmp_path / "new").exists()


# ---------------------------------------------------------------- --debug


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    path = tmp_path / "exp.yaml"
    path.write_text("train: {epochs: 2\n")
    args = ["train", "--config", str(path)]
    proc = dist_coop(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "yaml.parser.ParserError" in proc.stderr
    assert lines[-1].startswith(f"dist-coop: error: YAML error in {path}, line 2, column 1:")
