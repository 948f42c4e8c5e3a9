"""Video clips as image samples: ``dist-coop shards --video`` over class folders of clips.

ffmpeg (driven through ``ffmpeg-python``; install the binary with ``apt-get install ffmpeg``)
decodes each clip, samples ``fps`` frames per second, scales them to ``size`` x ``size`` and pipes
raw RGB frames out: one process per clip, not per frame. Each frame becomes a sample labelled
with its clip's class, so a video-classification dataset trains like an image one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from dist_coop.data.sources import Item, Source, class_tree

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}


def decode_frames(path: str | Path, *, fps: float, size: int) -> np.ndarray:
    """uint8 (T, size, size, 3) frames of a clip, ``fps`` per second."""
    import ffmpeg

    if shutil.which("ffmpeg") is None:
        raise FileNotFoundError("the ffmpeg binary is not installed (Debian/Ubuntu: apt-get install ffmpeg)")
    try:
        out, _ = (
            ffmpeg.input(str(path))
            .filter("fps", fps=fps)
            .filter("scale", size, size)
            .output("pipe:", format="rawvideo", pix_fmt="rgb24")
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as e:
        raise ValueError(
            f"ffmpeg cannot decode {path}: {e.stderr.decode(errors='replace').strip().splitlines()[-1:]}"
        ) from e
    frames = np.frombuffer(out, np.uint8)
    if frames.size == 0 or frames.size % (size * size * 3):
        raise ValueError(f"{path}: ffmpeg returned no whole frames")
    return frames.reshape(-1, size, size, 3)


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
