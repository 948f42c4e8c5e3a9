"""One net's depths on one batch: the work they share done once, each depth's own part when asked.

``DepthForward(net, x, depths)`` runs what several depths compute alike (the stem and common
blocks, ``AdaptiveNet.branch_starts``) at once; ``fw(s)`` then runs depth s's own part and
returns its logits. ``net`` is an ``AdaptiveNet``, an engine wrapping one (its forward takes the
same keywords), or anything with ``at_depth(s)`` and ``net(x)``, which shares nothing.

With ``detach=True`` each depth's part starts from a detached copy of its input, so each depth's
loss can be backpropagated as soon as it is known and its graph freed while the shared part
waits; ``trunk_loss()`` is then the one scalar whose backward takes every depth's gradient
through the shared part (the gradients equal those of one backward of the summed losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class DepthForward:
    def __init__(self, net: Any, x: Tensor, depths: Sequence[float], *, detach: bool = False) -> None:
        self.net, self.x = net, x
        plan = getattr(net, "branch_starts", None)
        self.starts = plan(depths) if plan is not None else dict.fromkeys(depths, -1)
        self.shared = any(p >= 0 for p in self.starts.values())
        self.inputs: dict[float, Tensor] = dict(zip(depths, net(x, depths=tuple(depths)))) if self.shared else {}
        self.detach = detach and self.shared
        self._leaves: dict[float, Tensor] = {}
        # the backward's loss scale, read as the gradient of a zero-valued probe term (see scaled())
        self._probe = torch.zeros((), device=x.device, requires_grad=True) if self.detach else None
        self._probed = False

    def __call__(self, s: float) -> Tensor:
        """Depth ``s``'s logits (B, num_classes); its own part runs now."""
        start = self.starts[s]
        if start < 0:
            with self.net.at_depth(s):
                return self.net(self.x)
        h = self.inputs[s]
        if self.detach:
            h = self._leaves[s] = h.detach().requires_grad_()
        return self.net(h, depth=s, start=start)

    def scaled(self, loss: Tensor) -> Tensor:
        """``loss`` plus, once, the probe term ``p - p.detach()`` (value 0): after a backward, p.grad is the
        factor that backward multiplied the loss by (an AMP or DeepSpeed loss scale, 1 in fp32)."""
        if self._probe is None or self._probed:
            return loss
        self._probed = True
        return loss + (self._probe - self._probe.detach())

    def trunk_loss(self) -> Tensor:
        """The scalar ``sum_s <h_s, g_s> / c`` whose backward is the shared part's.

        g_s is the gradient depth s's part left at its detached input, already multiplied by the loss
        scale c of the backward that produced it (read from the probe), which multiplies this loss too.
        Call after every depth's loss was backpropagated (with one ``scaled`` among them).
        """
        assert self.detach and self._probe is not None and self._probe.grad is not None, "no scaled backward yet"
        terms = [(self.inputs[s] * leaf.grad).sum() for s, leaf in self._leaves.items() if leaf.grad is not None]
        assert terms, "no depth's gradient reached the shared part"
        return torch.stack([t.float() for t in terms]).sum() / self._probe.grad
