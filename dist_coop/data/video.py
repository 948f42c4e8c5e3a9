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

from dist_coop.data.sources import Item, Source

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
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} is missing")

    def clips(d: Path) -> list[Path]:
        return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTS)

    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    nested = subdirs and all(not clips(d) and any(c.is_dir() for c in d.iterdir()) for d in subdirs)
    split_dirs = {d.name: d for d in subdirs} if nested else {"train": root}
    classes = sorted({c.name for d in split_dirs.values() for c in d.iterdir() if c.is_dir()})
    if not classes:
        raise ValueError(f"{root}: no class folders of clips found")
    index = {c: i for i, c in enumerate(classes)}
    src = Source("video_folder", classes)
    for split, d in split_dirs.items():
        items = []
        for c in sorted(x for x in d.iterdir() if x.is_dir()):
            for clip in clips(c):
                for t, frame in enumerate(decode_frames(clip, fps=fps, size=size)):
                    items.append(Item(f"{split}/{c.name}/{clip.stem}/{t:05d}", index[c.name], array=frame))
        src.splits[split] = items
    return src
