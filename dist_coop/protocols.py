"""The interfaces the loop relies on, declared once: what a training engine offers.

The trainer, the evaluation and the step guard use an engine only through ``Engine``; the torch engine
and the DeepSpeed engine (``dist_coop/distributed/engine.py``) both provide it. The batch streams' interface,
``Batches``, lives beside them in ``dist_coop/data/batches.py``; the tracker's in ``dist_coop/track/base.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dist_coop.models.adaptive import AdaptiveNet


class Engine(Protocol):
    """One net's training on this rank: forward, backward, clipping, the optimizer step, its checkpoint."""

    module: AdaptiveNet  # the net itself (depth scopes, BN statistics, gates)
    # can the step guard read the gradient norm (clip_grads) between backward and step? (DeepSpeed: no, it
    # computes the norm inside its step; the guard then checks the loss before backward)
    norm_before_step: bool
    dtype: torch.dtype  # what inputs are cast to (DeepSpeed's bf16/fp16 modules); float32 when nothing is cast

    def __call__(self, x: Tensor, **kwargs: Any) -> Any:
        """The net's forward (``AdaptiveNet.forward``'s keywords pass through)."""
        ...

    def at_depth(self, s: float) -> AbstractContextManager[AdaptiveNet]: ...
    def branch_starts(self, depths: Sequence[float]) -> dict[float, int]: ...
    def stage_gates(self) -> list[list[nn.Parameter]]: ...
    def backward(self, loss: Tensor, *, accumulate: bool = False) -> None:
        """Add ``loss``'s gradients; ``accumulate``: more backward calls follow before the step."""
        ...

    def clip_grads(self) -> Tensor | None:
        """Only where ``norm_before_step``: the gradient norm before clipping (None: not to be checked)."""
        ...

    def step(self, skip: bool = False) -> None:
        """The update (``skip``: dropped); the schedule advances either way."""
        ...

    def lr(self) -> float: ...
    def grad_stats(self) -> dict[str, float]: ...
    def save(self, folder: Path, name: str) -> None: ...
    def load(self, folder: Path, name: str) -> None: ...
