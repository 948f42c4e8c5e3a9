"""Video clips as image samples (``dist-coop shards --video``), and the one ffmpeg frame decoder.

``ffmpeg_frames`` runs ffmpeg (driven through ``ffmpeg-python``; install the binary with ``apt-get
install ffmpeg``) once per clip: it samples ``fps`` frames per second, scales them and pipes raw pixels
out, read one frame at a time. The shard writer takes every frame of a clip (``decode_frames``) and
labels it with the clip's class, so a video-classification dataset trains like an image one;
``dist-coop stream`` (``dist_coop/infer/stream.py``) classifies the frames as they arrive.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dist_coop.data.sources import Item, Source, class_tree

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
PIXEL_FORMATS = {1: "gray", 3: "rgb24"}  # channels -> ffmpeg's raw pixel format


def ffmpeg_frames(
    path: str | Path, *, height: int, width: int, channels: int = 3, fps: float | None = None
) -> Iterator[np.ndarray]:
    """uint8 (H, W, C) frames of a video file, scaled to ``height`` x ``width`` (C = 1: gray, 3: RGB), ``fps``
    per second (None: every frame), streamed from one ffmpeg process. A file ffmpeg cannot decode raises
    ValueError naming it and ffmpeg's last line; a consumer may stop early (closing the generator stops ffmpeg).
    """
    import ffmpeg

    if shutil.which("ffmpeg") is None:
        raise FileNotFoundError("the ffmpeg binary is not installed (Debian/Ubuntu: apt-get install ffmpeg)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if channels not in PIXEL_FORMATS:
        raise ValueError(f"channels must be one of {sorted(PIXEL_FORMATS)}, got {channels}")
    stream = ffmpeg.input(str(path))
    if fps:
        stream = stream.filter("fps", fps=fps)
    stream = stream.filter("scale", width, height).output("pipe:", format="rawvideo", pix_fmt=PIXEL_FORMATS[channels])
    proc = stream.run_async(pipe_stdout=True, pipe_stderr=True)
    stderr = bytearray()  # read beside the frames: a full stderr pipe would stall ffmpeg on a long clip
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr.read()), daemon=True)
    drain.start()
    size = height * width * channels
    try:
        while True:
            buf = proc.stdout.read(size)
            if len(buf) < size:
                break
            yield np.frombuffer(buf, np.uint8).reshape(height, width, channels)
    finally:
        proc.stdout.close()  # a consumer that stopped early: ffmpeg's next write fails and it exits
        code = proc.wait()
        drain.join()
        proc.stderr.close()
    if code != 0:  # only once the pipe ran dry: an early stop makes ffmpeg fail on its broken pipe
        err = stderr.decode(errors="replace").strip()
        raise ValueError(f"ffmpeg cannot decode {path}: {err.splitlines()[-1] if err else f'exit code {code}'}")


def decode_frames(path: str | Path, *, fps: float, size: int) -> np.ndarray:
    """uint8 (T, size, size, 3) frames of a clip, ``fps`` per second."""
    frames = list(ffmpeg_frames(path, height=size, width=size, channels=3, fps=fps))
    if not frames:
        raise ValueError(f"{path}: ffmpeg returned no whole frames")
    return np.stack(frames)


def video_folder(root: str | Path, *, fps: float = 1.0, size: int = 64) -> Source:
    """``root/<split>/<class>/clip`` or ``root/<class>/clip`` (split 'train') -> frame samples."""
    classes, splits = class_tree(root, VIDEO_EXTS, "video")
    src = Source("video_folder", classes)
    for split, clips in splits.items():
        src.splits[split] = [
            Item(f"{split}/{clip.parent.name}/{clip.stem}/{t:05d}", label, array=frame)
            for label, clip in clips
            for t, frame in enumerate(decode_frames(clip, fps=fps, size=size))
        ]
    return src
