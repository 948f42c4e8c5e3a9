"""Per-depth cost profile of a trained net: FLOPs, parameters that run, latency, accuracy.

Latency is the median of repeated forwards after warm-up, on this device, at batch 1 and at a
batch size the user picks. The profile is plain data (JSON) so it can be stored beside the
checkpoint, logged as an artifact and read by the budget selector and the run-time controller.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dist_coop.infer.cost import depth_costs
from dist_coop.models.adaptive import AdaptiveNet


@dataclass(frozen=True)
class DepthProfile:
    s: float
    blocks: int
    gflops: float  # per image, forward
    params: int
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ms per forward
    accuracy: float | None = None  # validation top-1 %, from training


@dataclass(frozen=True)
class Profile:
    device: str
    input_shape: tuple[int, ...]
    depths: tuple[DepthProfile, ...]

    def by_depth(self) -> dict[float, DepthProfile]:
        return {d.s: d for d in self.depths}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> Profile:
        raw = json.loads(text)
        depths = tuple(
            DepthProfile(**{**d, "latency_ms": {int(k): v for k, v in d["latency_ms"].items()}}) for d in raw["depths"]
        )
        return Profile(raw["device"], tuple(raw["input_shape"]), depths)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    def table(self) -> str:
        batches = sorted({b for d in self.depths for b in d.latency_ms})
        head = (
            f"{'s':>6}{'blocks':>8}{'GFLOPs':>10}{'params':>10}"
            + "".join(f"{f'ms@b{b}':>11}" for b in batches)
            + f"{'top-1 %':>9}"
        )
        rows = [head, "-" * len(head)]
        for d in self.depths:
            acc = f"{d.accuracy:>9.2f}" if d.accuracy is not None else f"{'-':>9}"
            rows.append(
                f"{d.s:>6g}{d.blocks:>8}{d.gflops:>10.4f}{d.params:>10,}"
                + "".join(f"{d.latency_ms.get(b, float('nan')):>11.3f}" for b in batches)
                + acc
            )
        return "\n".join(rows) + f"\n(device: {self.device}, input {list(self.input_shape)})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(net: AdaptiveNet, x: torch.Tensor, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of one forward of ``net`` (at its current depth) on ``x``."""
    for _ in range(warmup):
        net(x)
    times = []
    for _ in range(repeats):
        _sync(x.device)
        t = time.perf_counter()
        net(x)
        _sync(x.device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def profile_net(
    net: AdaptiveNet,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    accuracy: Mapping[float, float] | None = None,
    repeats: int = 20,
    warmup: int = 3,
) -> Profile:
    """The cost profile of every depth of ``net``."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    costs = depth_costs(net, input_shape)
    depths = []
    try:
        for s in net.scaling_factors:
            with net.at_depth(s):
                lat = {
                    b: measure_latency(net, torch.randn(b, *input_shape, device=device), repeats=repeats, warmup=warmup)
                    for b in batch_sizes
                }
            c = costs[s]
            depths.append(DepthProfile(s, c.blocks, c.gflops, c.params, lat, (accuracy or {}).get(s)))
    finally:
        net.train(was_training)
    return Profile(str(device), tuple(input_shape), tuple(depths))
