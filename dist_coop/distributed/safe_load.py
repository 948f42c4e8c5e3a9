"""DeepSpeed checkpoints read without arbitrary unpickling.

DeepSpeed reads its files with ``torch.load(weights_only=False)`` (its checkpoint engine, its ZeRO optimizers,
``zero_to_fp32``): a file holding a pickled object whose ``__reduce__`` names any callable would run it on load,
so a checkpoint from elsewhere could run code on every rank that resumes from it or evaluates it. Our own
checkpoints load weights-only (``dist_coop.checkpoint``); :func:`deepspeed_loads_weights_only` makes DeepSpeed's
do the same: tensors, plain Python values and the few DeepSpeed classes a checkpoint of ours holds
(:func:`deepspeed_checkpoint_globals`), nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def deepspeed_checkpoint_globals() -> list[type]:
    """The classes, besides tensors and plain values, that DeepSpeed writes into the checkpoints of this
    package (ZeRO 0-3): the loss scalers (ZeRO 1-3; the dynamic one with fp16), the ZeRO stage enum, and the
    address of a parameter's fragment in a flat partition (ZeRO 1-2, and bf16 at ZeRO-0). Each is a plain holder
    of numbers: loading one sets attributes and calls no code of its own."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")
_TORCH_PREAMBLE = ("Weights only load failed", "Check the documentation")


def _reason(error: BaseException) -> str:
    """One line from torch's (multi-line) refusal: the global the file names, or the error's first sentence."""
    text = str(error)
    if m := _GLOBAL.search(text):
        return f"it names {m.group(1)}, which a weights-only load refuses (is the file from a source you trust?)"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(_TORCH_PREAMBLE)]
    return lines[0].split(". ")[0] if lines else type(error).__name__


def load_weights_only(
    path: str | Path, map_location: str | torch.device | None = "cpu", allowed: Sequence[Any] = ()
) -> Any:
    """``torch.load(path, weights_only=True)``, with ``allowed`` globals besides torch's own; a file that needs
    anything else (or is not a checkpoint at all) raises a one-line ValueError naming it."""
    with torch.serialization.safe_globals(_missing(allowed)):
        return _load(_original_load(), path, map_location=map_location)


_ORIGINAL = "_weights_only_original"  # on the wrapper weights_only_loads installs: the torch.load it replaced


def _original_load() -> Callable[..., Any]:
    return getattr(torch.load, _ORIGINAL, torch.load)


def _missing(allowed: Sequence[Any]) -> list[Any]:
    """Those of ``allowed`` not yet in torch's process-wide list (leaving its list as it was on exit)."""
    present = set(torch.serialization.get_safe_globals())
    return [g for g in allowed if g not in present]


def _load(load: Callable[..., Any], f: Any, *args: Any, **kwargs: Any) -> Any:
    if kwargs.get("pickle_module") is not None or len(args) > 1:
        raise ValueError(f"cannot load checkpoint {f}: a weights-only load takes no pickle module")
    kwargs["weights_only"] = True
    try:
        return load(f, *args, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as e:  # a pickle that is not weights-only, a truncated file, not a checkpoint
        raise ValueError(f"cannot load checkpoint {f}: {_reason(e)}") from e


@contextlib.contextmanager
def weights_only_loads(allowed: Sequence[Any] = ()) -> Iterator[None]:
    """While inside, every ``torch.load`` in this process loads weights only (whatever ``weights_only`` the
    caller passed), with ``allowed`` globals besides torch's own; a file that needs anything else raises a
    one-line ValueError naming it. ``torch.load`` is restored on the way out.

    Not thread-safe: ``torch.load`` and torch's list of allowed globals are process-wide, so a load in another
    thread while this block is open is restricted too (never less), and two such blocks open at once in
    different threads could leave each other's patch in place. Nested blocks in one thread are fine.
    """
    original = torch.load
    if hasattr(original, _ORIGINAL):  # already inside such a block
        with torch.serialization.safe_globals(_missing(allowed)):
            yield
        return

    @functools.wraps(original)
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        return _load(original, f, *args, **kwargs)

    setattr(load, _ORIGINAL, original)
    torch.load = load
    try:
        with torch.serialization.safe_globals(_missing(allowed)):
            yield
    finally:
        torch.load = original


def deepspeed_loads_weights_only() -> contextlib.AbstractContextManager[None]:
    """While DeepSpeed reads a checkpoint of this package: every file loads weights-only, allowing only the
    classes of :func:`deepspeed_checkpoint_globals` (see :func:`weights_only_loads`)."""
    return weights_only_loads(deepspeed_checkpoint_globals())
