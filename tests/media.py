"""Test media made with the real ffmpeg binary."""

import shutil
import subprocess
from pathlib import Path

import pytest


def make_clip(path: Path, pattern: str = "testsrc2", *, size: str = "96x72", rate: int = 10, seconds: int = 2) -> Path:
    """An H.264/MPEG-4 clip of an ffmpeg test pattern; skips the test where ffmpeg is not installed."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg binary not installed (apt-get install ffmpeg)")
    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"{pattern}=size={size}:rate={rate}:duration={seconds}"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", source, "-pix_fmt", "yuv420p", str(path)], check=True)
    return path
