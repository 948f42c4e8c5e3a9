"""Closed-loop depth control for a stream of inputs with a latency target.

After every call the controller compares the measured latency with the profile's latency of the
depth that ran and keeps a running estimate of the device's slow-down: the median of the last
``window`` ratios measured / profiled (one scheduler hiccup does not move it). It predicts every
depth's latency as profiled x slow-down, steps down at once to the deepest depth predicted to
meet the target when the current one misses it, and steps up one depth after ``patience`` calls
in a row in which the deeper depth is predicted to fit with a ``hysteresis`` margin.

A multiplicative slow-down mispredicts when fixed per-call costs dominate the shallow depths
(measured here: a paced stream runs the 0.25 sub-net ~1.5x slower than the back-to-back profile,
the full net less so), which can pin it at a shallow depth. So it also *probes*: after
``probe_every`` calls that met the target it tries the next deeper depth once; a probe that
misses goes back down and doubles the interval (up to 16x). Switching is a depth scope
(``with net.at_depth(s)``): no rebuild, no reload, and the net is left at its own depth after each call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dist_coop.models.adaptive import AdaptiveNet


class DepthController:
    def __init__(
        self,
        latency_ms: Mapping[float, float],
        target_ms: float,
        *,
        hysteresis: float = 0.15,
        patience: int = 5,
        window: int = 5,
        probe_every: int = 30,
    ) -> None:
        if target_ms <= 0:
            raise ValueError(f"target_ms must be > 0, got {target_ms}")
        if window < 1 or patience < 1 or probe_every < 1:
            raise ValueError("window, patience and probe_every must be >= 1")
        self.base = dict(sorted(latency_ms.items()))  # s -> profiled ms, shallow to deep
        self.factors = list(self.base)
        self.target, self.hysteresis, self.patience, self.window = target_ms, hysteresis, patience, window
        self.probe_every, self._probe_interval = probe_every, probe_every
        self.slowdown = 1.0
        self._ratios: list[float] = []
        self._calm = self._met = 0
        self._probing = False
        self.depth = self._deepest_fitting(target_ms)

    def predict(self, s: float) -> float:
        return self.base[s] * self.slowdown

    def _deepest_fitting(self, limit: float) -> float:
        fitting = [s for s in self.factors if self.predict(s) <= limit]
        return fitting[-1] if fitting else self.factors[0]

    def update(self, measured_ms: float) -> float:
        """Record the latency of the call just made at ``self.depth``; returns the depth for the next call."""
        probing, self._probing = self._probing, False
        self._ratios = (self._ratios + [measured_ms / self.base[self.depth]])[-self.window :]
        self.slowdown = sorted(self._ratios)[len(self._ratios) // 2]
        i = self.factors.index(self.depth)
        deeper = self.factors[i + 1] if i + 1 < len(self.factors) else None
        if measured_ms > self.target and self.predict(self.depth) > self.target:  # missing: down at once
            if probing:
                self._probe_interval = min(16 * self.probe_every, 2 * self._probe_interval)
            self.depth, self._calm, self._met = self._deepest_fitting(self.target), 0, 0
            return self.depth
        if probing:  # the probe met the target: stay, and probe at the normal rate again
            self._probe_interval = self.probe_every
        self._met += 1
        if deeper is not None and self.predict(deeper) <= self.target * (1 - self.hysteresis):
            self._calm += 1
        else:
            self._calm = 0
        if deeper is not None and (self._calm >= self.patience or self._met >= self._probe_interval):
            self._probing = self._calm < self.patience  # up without the model's backing: a probe
            self.depth, self._calm, self._met = deeper, 0, 0
        return self.depth


@dataclass(frozen=True)
class Step:
    depth: float
    latency_ms: float
    logits: torch.Tensor


class AdaptiveRunner:
    """Runs ``net`` on each input at the controller's depth, measures it, feeds the controller."""

    def __init__(self, net: AdaptiveNet, controller: DepthController) -> None:
        self.net, self.controller = net.eval(), controller

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Step:
        depth = self.controller.depth
        with self.net.at_depth(depth):  # an error in the forward does not leave the net shallow
            t = time.perf_counter()
            logits = self.net(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            ms = (time.perf_counter() - t) * 1e3
        self.controller.update(ms)
        return Step(depth, ms, logits)
