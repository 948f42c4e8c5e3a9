"""The step guard: once per step the host learns whether each net's loss and gradient are finite, and
whether any rank has been asked to stop, from one small tensor.

The flags are computed on the device (``torch.isfinite`` of each net's total loss and of the
gradient norm its engine computes for clipping anyway), written into one (1 + 2 x nets) tensor,
summed over the world when there is more than one process (so every rank skips, raises or stops
at the same step) and read with one ``.tolist()``. That read is the guard's only device sync per
step, for all nets together; on a GPU it makes the host wait for backward to finish before it
launches the optimizer step (the fp16 GradScaler already syncs there, and the loop at log steps).

``train.on_nonfinite``: ``error`` raises ``NonFiniteError`` naming the net, the step and what was
not finite; ``skip`` drops that net's update (gradients zeroed, BN statistics of the step restored,
the schedule still advances) and raises after ``train.max_nonfinite`` consecutive skips of one net.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dist_coop.choices import ON_NONFINITE
from dist_coop.distributed.comm import all_reduce_world
from dist_coop.distributed.env import DistInfo


class NonFiniteError(RuntimeError):
    """A net's loss, gradient or weights are not finite: training cannot go on from here."""


class StepGuard:
    """Per step: ``snapshot()`` before the forward, ``check()`` before the update; ``stop`` after it."""

    def __init__(
        self,
        net_names: Sequence[str],
        modules: Mapping[str, nn.Module],
        *,
        mode: str = "error",
        max_consecutive: int = 10,
        dist: DistInfo | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        """``net_names``: every net of the run in the same order on every rank; ``modules``: the local ones."""
        if mode not in ON_NONFINITE:
            raise ValueError(f"train.on_nonfinite must be one of {list(ON_NONFINITE)}, got {mode!r}")
        self.net_names, self.modules = list(net_names), dict(modules)
        self.mode, self.max_consecutive = mode, max_consecutive
        self.dist = dist or DistInfo()
        self.stop_requested = stop_requested
        self.stop = False  # some rank was asked to stop, as of the last check (the same on every rank)
        self.skipped = dict.fromkeys(self.net_names, 0)  # steps skipped per net, for the whole run
        self.consecutive = dict.fromkeys(self.net_names, 0)
        self._buffers: dict[str, list[Tensor]] = {}

    def snapshot(self) -> None:
        """Skip mode: keep the local nets' buffers (BN statistics) so a skipped step's forward leaves no trace."""
        if self.mode == "skip":
            self._buffers = {name: [b.detach().clone() for b in m.buffers()] for name, m in self.modules.items()}

    def check(
        self, step: int, losses: Mapping[str, Tensor], grad_norms: Mapping[str, Tensor | None] | None = None
    ) -> set[str]:
        """Check the local nets about to take optimizer step ``step + 1``; returns those whose update to skip.

        ``losses``: each local net's total loss; ``grad_norms``: its gradient norm, where one is known
        and a non-finite one is not routine (None: not checked). Raises ``NonFiniteError``.
        """
        grad_norms = grad_norms or {}
        device = next(iter(losses.values())).device
        flags = torch.zeros(1 + 2 * len(self.net_names), device=device)
        flags[0] = float(self.stop_requested())
        for i, name in enumerate(self.net_names):
            if name in losses:
                flags[1 + 2 * i] = (~torch.isfinite(losses[name].detach())).float()
            if grad_norms.get(name) is not None:
                flags[2 + 2 * i] = (~torch.isfinite(grad_norms[name])).float()
        values = all_reduce_world(flags, self.dist).tolist()  # the one sync
        self.stop = values[0] > 0
        bad: dict[str, str] = {}  # net -> what was not finite (a non-finite loss has non-finite gradients too)
        for i, name in enumerate(self.net_names):
            if values[1 + 2 * i] > 0 or values[2 + 2 * i] > 0:
                bad[name] = "loss" if values[1 + 2 * i] > 0 else "gradient"
            else:
                self.consecutive[name] = 0
        if not bad:
            return set()
        which = ", ".join(f"{what} of {name}" for name, what in bad.items())
        if self.mode == "error":
            raise NonFiniteError(
                f"non-finite {which} at step {step + 1} (train.on_nonfinite: error); "
                "lower optim.lr or optim.grad_clip, or set train.on_nonfinite: skip to drop such steps"
            )
        for name in bad:
            self.skipped[name] += 1
            self.consecutive[name] += 1
        worst = max(bad, key=self.consecutive.__getitem__)
        if self.consecutive[worst] >= self.max_consecutive:
            raise NonFiniteError(
                f"non-finite {bad[worst]} of {worst} on {self.consecutive[worst]} consecutive steps "
                f"(the last: step {step + 1}; train.max_nonfinite: {self.max_consecutive}); the run diverged"
            )
        skip = {name for name in bad if name in self.modules}
        for name in skip:
            self._restore(name)
        return skip

    def _restore(self, name: str) -> None:
        for b, saved in zip(self.modules[name].buffers(), self._buffers.get(name, [])):
            b.copy_(saved)

    def metrics(self) -> dict[str, float]:
        """``train/nonfinite_skipped/<net>`` of the local nets."""
        return {f"train/nonfinite_skipped/{name}": float(self.skipped[name]) for name in self.modules}

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"skipped": dict(self.skipped), "consecutive": dict(self.consecutive)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, int]]) -> None:
        self.skipped.update(state.get("skipped", {}))
        self.consecutive.update(state.get("consecutive", {}))


def nonfinite_nets(modules: Mapping[str, nn.Module], net_names: Sequence[str], info: DistInfo) -> list[str]:
    """The nets (of every rank, the same list on every rank) with a non-finite parameter or buffer."""
    flags = torch.zeros(len(net_names), device=info.device)
    for i, name in enumerate(net_names):
        if name in modules:
            state = [t for t in modules[name].state_dict().values() if t.is_floating_point() and t.numel()]
            if state:
                flags[i] = (~torch.stack([torch.isfinite(t).all() for t in state]).all()).float()
    bad = all_reduce_world(flags, info).tolist()
    return [name for name, flag in zip(net_names, bad) if flag > 0]
