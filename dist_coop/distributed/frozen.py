"""The engine of a frozen net (``coop.leader_mode: frozen``): forwards in eval mode, nothing else.

It has the loop's engine interface (``backward``, ``step``, ``save``, ``load``...) so the loop needs no branch
for it, but no optimizer, no schedule and no gradients: its parameters and BN statistics stay as loaded.
Its checkpoint holds the weights only (``<name>.pt`` with ``module``, as the torch engine's), so a run with a
frozen net reads back whole (``dist_coop.checkpoint.net_state_dict``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dist_coop.checkpoint import load_checkpoint, net_file, save_checkpoint
from dist_coop.distributed.engine import _NetAccess
from dist_coop.models.adaptive import AdaptiveNet


class FrozenEngine(_NetAccess):
    norm_before_step = True  # nothing to check: no gradients
    dtype = torch.float32
    frozen = True  # the loop keeps the net in eval mode and gives it no loss

    def __init__(self, net: AdaptiveNet, *, group_rank: int = 0) -> None:
        self.module = net.eval().requires_grad_(False)
        self.group_rank = group_rank

    def __call__(self, x: Tensor, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(x, **kwargs)

    def backward(self, loss: Tensor, *, accumulate: bool = False) -> None:
        """Nothing to backpropagate into."""

    def clip_grads(self) -> Tensor | None:
        return None

    def step(self, skip: bool = False) -> None:
        """No update."""

    def lr(self) -> float:
        return 0.0

    def grad_stats(self) -> dict[str, float]:
        return {}

    def save(self, folder: Path, name: str) -> None:
        """The weights (group rank 0; every replica holds the same)."""
        if self.group_rank == 0:
            save_checkpoint({"module": self.module.state_dict(), "frozen": True}, net_file(folder, name))

    def load(self, folder: Path, name: str) -> None:
        state = load_checkpoint(net_file(folder, name), next(self.module.parameters()).device)
        self.module.load_state_dict(state["module"])
