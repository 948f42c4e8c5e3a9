"""Limits on what is read from files that other people made: shard indexes, shards, images, pickles.

Shards, their ``index.json`` and the dataset files the writer reads may come from anyone (a download,
a shared folder), so none of them decides what code runs or how much memory a read takes:

* a shard name in an index is a plain file name inside the shard folder (``check_shard_name``), so it
  never reaches a URL opener or a path outside the folder;
* an image is opened only by the formats it may hold (the shards store JPEG and PNG; the writer reads
  JPEG, PNG, BMP, GIF and WebP files), never by every format PIL knows (EPS runs Ghostscript), and
  refused before decoding when it has more pixels than allowed (``open_image``);
* a pickle (CIFAR's batches) is read by an unpickler that builds only dicts, lists, bytes, text,
  numbers and numpy arrays (``load_pickle``), never calling what the pickle names.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

MAX_PIXELS = 8192 * 8192  # the most pixels an image may have, written or read
MAX_MEMBER_BYTES = 256 << 20  # the largest file the writer reads, and tar member the stream reads
SHARD_FORMATS = {"jpg": "JPEG", "png": "PNG"}  # the image fields a shard holds and the format of each
SOURCE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")  # the formats of the dataset files the writer reads
HIDDEN_DIRS = ("__MACOSX",)  # folders of a macOS zip, beside the names starting with a dot


class Refused(ValueError):
    """An input over a limit or of a format not read; the message names the problem, the caller the file."""


class TooLarge(Refused):
    """An image with more pixels, or a file or tar member with more bytes, than allowed."""


def hidden(path: Path) -> bool:
    """True for a file that is part of no dataset: a dot file (``.DS_Store``, macOS' ``._name.JPEG``) or a
    ``__MACOSX`` folder."""
    return path.name.startswith(".") or path.name in HIDDEN_DIRS


def check_shard_name(name: Any, index: str | Path) -> str:
    """``name`` when it is a plain ``.tar`` file name in the shard folder; else a one-line ValueError
    naming ``index`` and the name."""
    plain = (
        isinstance(name, str)
        and name.endswith(".tar")
        and not name.startswith(".")
        and not any(c in name for c in "/\\:\0")
    )
    if not plain:
        raise ValueError(
            f"{index}: shard name {name!r} is not a plain .tar file name in the shard folder (no scheme, '/', "
            "'..', leading dot or NUL); the index was edited or not written by dist-coop shards: write the "
            "shards again"
        )
    return name


def split_limits(info: dict[str, Any]) -> tuple[tuple[int, str], tuple[int, str]]:
    """((most pixels, whose limit), (largest tar member, whose limit)) of a split's index entry: the largest the
    index records, never over the global caps; the caps alone (limit "") for an index that records none."""
    pixels: tuple[int, str] = (MAX_PIXELS, "")
    try:
        count, largest = max((math.prod(int(v) for v in s.split("x")), s) for s in info.get("sizes") or {})
        if 0 < count <= MAX_PIXELS:
            pixels = (count, f"the largest image the index records ({largest})")
    except (ValueError, TypeError, AttributeError):  # no sizes recorded, or not as "WxH"
        pass
    recorded = info.get("max_member_bytes")
    if isinstance(recorded, int) and 0 < recorded <= MAX_MEMBER_BYTES:
        return pixels, (recorded, f"the largest the index records ({recorded:,} bytes)")
    return pixels, (MAX_MEMBER_BYTES, "")


def open_image(data: bytes, formats: tuple[str, ...], max_pixels: int, limit: str):
    """A PIL image of ``data`` opened by ``formats`` only, not yet decoded; Refused when it is another format
    or has more than ``max_pixels`` pixels (``limit`` says whose limit that is)."""
    from PIL import Image, UnidentifiedImageError

    names = f"{', '.join(formats[:-1])} or {formats[-1]} formats" if len(formats) > 1 else f"{formats[0]} format"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=formats)
        except UnidentifiedImageError:
            raise Refused(f"not an image file of the {names}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise TooLarge(f"image has more pixels than {limit}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise TooLarge(f"image is {width}x{height} pixels, more than {limit}")
    return img


def _latin1(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as pickles of protocol 2 use it to hold bytes: latin-1 only."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1", errors)


def _pickle_globals() -> dict[tuple[str, str], Any]:
    """The callables a pickle of dicts, lists, bytes and numpy arrays names, by every module name numpy used."""
    import numpy as np

    reconstruct = np.ndarray(0).__reduce__()[0]
    scalar = np.uint8(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed = {("_codecs", "encode"): _latin1, ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise Refused(f"it names {module}.{name}")
        return self.allowed[(module, name)]


def load_pickle(path: str | Path, what: str) -> Any:
    """Unpickle ``path`` (Python 2 strings as bytes) admitting only dicts, lists, bytes, text, numbers and numpy
    arrays; anything else is a one-line ValueError naming the file and ``what`` it should have been."""
    _ArrayUnpickler.allowed = _ArrayUnpickler.allowed or _pickle_globals()
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f, encoding="bytes").load()
        except Refused as e:
            raise ValueError(
                f"{path} is not {what}: {e}, and such a file holds only dicts, lists, bytes, text, numbers and "
                "numpy arrays; it is not read (it could run code): get the dataset from its authors again"
            ) from None
        except Exception as e:  # UnpicklingError, EOFError, ... of a file that is no pickle or is cut short
            raise ValueError(f"{path} is not {what}: {' '.join(str(e).split()) or type(e).__name__}") from e
