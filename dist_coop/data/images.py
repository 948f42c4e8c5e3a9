"""One sample made ready for a shard: decoded once, in the dataset's channel mode.

Files on disk come in any PIL mode (grayscale JPEGs in Tiny ImageNet, CMYK JPEGs, palette or RGBA
PNGs, 16-bit PNGs); sources also hand over arrays. The writer decodes every sample once, so a file
that does not decode is reported by the writer, naming the file, instead of by a training run hours
later, and every image reaches the shard in one mode (``L`` or ``RGB``): a grayscale JPEG in an RGB
dataset is stored as RGB. JPEG and PNG files already in that mode keep their bytes; everything else
is converted and stored as lossless PNG. Alpha is dropped (as torchvision's ``pil_loader`` does);
16-bit grayscale is scaled from 0..65535 to 0..255 (PIL's own conversion would clip it).
Files are opened only as JPEG, PNG, BMP, GIF or WebP, and refused before decoding when larger than
``safety.MAX_MEMBER_BYTES`` or ``safety.MAX_PIXELS``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_coop.data.safety import MAX_MEMBER_BYTES, MAX_PIXELS, SOURCE_FORMATS, Refused, TooLarge, open_image
from dist_coop.data.sources import Item

MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode the shards store
KEEP_BYTES = {"JPEG": "jpg", "PNG": "png"}  # formats whose bytes go into a shard as they are
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16/32-bit grayscale


@dataclass(frozen=True)
class Encoded:
    """A sample ready for the tar writer, or the reason its source cannot be used (``error``)."""

    key: str
    label: int
    source: str  # the file it came from (or the array's key), for messages and the skipped list
    ext: str = ""
    data: bytes = b""
    size: tuple[int, int] = (0, 0)  # (width, height)
    converted_from: str = ""  # the mode it was stored in, when that was not the dataset's mode
    error: str = ""


def to_mode(img, mode: str):
    """``img`` (a PIL image of any mode) as ``mode`` (``L`` or ``RGB``)."""
    from PIL import Image

    if img.mode == mode:
        return img
    if img.mode in WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a / 257.0 if img.mode != "F" else a, 0, 255).round().astype(np.uint8))
    elif img.mode in ("P", "PA"):  # palette: through RGBA when it has transparency (PIL warns otherwise)
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode in ("La", "RGBa"):  # premultiplied alpha
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    return img if img.mode == mode else img.convert(mode)


def reason(e: Exception) -> str:
    """One line saying why PIL could not read or convert an image."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    if isinstance(e, Refused):
        return str(e)
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{text}" if isinstance(e, OSError) else f"{type(e).__name__}: {text}"


def _open(item: Item):
    """(decoded PIL image, file bytes or None, format) of ``item``."""
    from PIL import Image

    if item.array is not None:
        a = np.asarray(item.array)
        return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else np.ascontiguousarray(a)), None, ""
    size = Path(item.path).stat().st_size
    if size > MAX_MEMBER_BYTES:
        raise TooLarge(f"file is {size:,} bytes, more than the {MAX_MEMBER_BYTES:,} bytes an image file may have")
    data = Path(item.path).read_bytes()
    img = open_image(data, SOURCE_FORMATS, MAX_PIXELS, f"the {MAX_PIXELS:,} pixels an image in a shard may have")
    img.load()  # decodes all of it: a truncated file fails here, not in a training run
    return img, data, img.format or ""


def encode(item: Item, mode: str) -> Encoded:
    """Decode ``item`` once, check it, convert it to ``mode``; never raises for a bad file (see ``error``)."""
    source = item.path or item.key
    try:
        img, data, fmt = _open(item)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
        return Encoded(item.key, item.label, source, error=f"cannot read image {source}: {reason(e)}")
    stored = img.mode
    try:
        img = to_mode(img, mode)
        if data is not None and stored == mode and fmt in KEEP_BYTES and getattr(img, "n_frames", 1) == 1:
            ext = KEEP_BYTES[fmt]
        else:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            ext, data = "png", buf.getvalue()
    except Exception as e:
        return Encoded(
            item.key, item.label, source, error=f"cannot convert {source} from {stored} to {mode}: {reason(e)}"
        )
    return Encoded(item.key, item.label, source, ext, data, img.size, converted_from="" if stored == mode else stored)


def channel_stats(items: list[Item], mode: str) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels in [0, 1] over ``items`` in ``mode``; unreadable items are left out."""
    channels = len(mode)
    total, total_sq, n = np.zeros(channels), np.zeros(channels), 0
    for it in items:
        try:
            img = to_mode(_open(it)[0], mode)
        except Exception:
            continue  # the writer reports (or skips) it
        a = np.asarray(img, dtype=np.float64).reshape(-1, channels) / 255.0
        total, total_sq, n = total + a.sum(0), total_sq + (a * a).sum(0), n + len(a)
    if n == 0:
        return [0.5] * channels, [0.5] * channels
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0)) + 1e-6
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]
