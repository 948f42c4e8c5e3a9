"""``dist-coop stream``: classify the frames of a video with the depth controller holding a latency target.

Frames are decoded and scaled by ffmpeg (``dist_coop.data.video.ffmpeg_frames``) into raw pixels on a pipe,
paced at the clip's frame rate (as a camera would deliver them) unless ``pace`` is off, normalised
like the training data and classified one at a time by an ``AdaptiveRunner``.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_coop.data.augment import normalize
from dist_coop.infer.controller import AdaptiveRunner


def probe_video(path: str | Path) -> dict:
    """ffprobe's description of the file's video stream; a missing file, one ffmpeg cannot read and one
    without a picture stream (audio only; an MP3's cover art does not count) each raise naming the file and why."""
    import ffmpeg

    if shutil.which("ffprobe") is None:
        raise FileNotFoundError("the ffprobe binary is not installed (Debian/Ubuntu: apt-get install ffmpeg)")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"video {path} is a folder, not a video file")
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        streams = ffmpeg.probe(str(path))["streams"]
    except ffmpeg.Error as e:
        lines = e.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1].removeprefix(f"{path}: ") if lines else "ffprobe failed"
        raise ValueError(f"{path} is not a video ffmpeg can read: {why}") from e
    video = [s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    if not video:
        kinds = sorted({s.get("codec_type", "unknown") for s in streams}) or ["no streams"]
        has = " and ".join("a cover picture" if k == "video" else k for k in kinds)
        raise ValueError(f"{path} has no video stream (it holds {has}): stream needs a video file")
    return video[0]


def clip_fps(path: str | Path) -> float:
    """The clip's frame rate (25 where the file does not say); checks the file as ``probe_video`` does."""
    num, den = probe_video(path)["avg_frame_rate"].split("/")
    return float(num) / float(den) if float(den) else 25.0


@dataclass(frozen=True)
class FrameResult:
    index: int
    time_s: float
    depth: float
    latency_ms: float
    label: int
    confidence: float


def run_stream(
    runner: AdaptiveRunner,
    frames: Iterator[np.ndarray],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    classes: Sequence[str],
    fps: float,
    pace: bool = True,
    device: torch.device | str = "cpu",
    printer=print,
) -> list[FrameResult]:
    results = []
    start = time.perf_counter()
    for i, frame in enumerate(frames):
        if pace:  # deliver frames at the clip's rate, as a camera would
            delay = start + i / fps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        x = normalize(torch.from_numpy(frame.copy()).permute(2, 0, 1)[None].to(device), mean, std)  # (1, C, H, W)
        step = runner(x)
        prob = step.logits.float().softmax(-1)[0]
        label = int(prob.argmax())
        r = FrameResult(i, time.perf_counter() - start, step.depth, step.latency_ms, label, float(prob[label]))
        results.append(r)
        if printer:
            printer(
                f"frame {i:5d}  t {r.time_s:6.2f}s  depth {r.depth:<5g} {r.latency_ms:7.2f} ms  {classes[label]} ({r.confidence:.2f})"
            )
    return results


def summarize(results: Sequence[FrameResult], target_ms: float) -> str:
    if not results:
        return "no frames"
    met = sum(r.latency_ms <= target_ms for r in results)
    depths = Counter(r.depth for r in results)
    mean_depth = sum(r.depth for r in results) / len(results)
    lat = sorted(r.latency_ms for r in results)
    return (
        f"{len(results)} frames, target {target_ms:g} ms: {100 * met / len(results):.1f} % met; mean depth {mean_depth:.3f}; "
        f"latency median {lat[len(lat) // 2]:.2f} ms, p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} ms; "
        f"frames per depth {dict(sorted(depths.items()))}"
    )


def plot_stream(results: Sequence[FrameResult], target_ms: float, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r.time_s for r in results]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, dpi=110)
    a.plot(t, [r.latency_ms for r in results], lw=0.8, label="latency")
    a.axhline(target_ms, color="red", ls="--", label="target")
    a.set_ylabel("ms per frame")
    a.legend()
    b.step(t, [r.depth for r in results], where="post")
    b.set_ylabel("depth s")
    b.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
