"""Per-depth cost profile of a trained net: FLOPs, parameters that run, latency, accuracy.

Latency is the median of repeated forwards after warm-up, on this device, at batch 1 and at a
batch size the user picks, in the runtime that will serve (``RUNTIMES``: the adaptive net in eager PyTorch,
the exported ``torch.export`` program of each depth, or its ONNX export in onnxruntime) with a given number of
threads; the profile records both. It is plain data (JSON) so it can be stored beside the checkpoint, logged as
an artifact and read by the budget selector and the run-time controller.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_coop.infer.cost import depth_costs
from dist_coop.infer.export import export_program, onnx_program, static_subnet
from dist_coop.models.adaptive import AdaptiveNet

RUNTIMES = ("eager", "pt2", "onnxruntime")


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
    runtime: str = "eager"  # what ran the timed forwards: one of RUNTIMES
    threads: int = 0  # the runtime's intra-op threads (0: not recorded, a profile written before they were)

    def measured_in(self) -> str:
        """Where the latencies come from: ``onnxruntime, 1 thread, cpu``."""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "threads not recorded"
        return f"{self.runtime}, {threads}, {self.device}"

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
        return Profile(
            raw["device"], tuple(raw["input_shape"]), depths, raw.get("runtime", "eager"), int(raw.get("threads", 0))
        )

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
        return "\n".join(rows) + f"\n(measured in {self.measured_in()}; input {list(self.input_shape)})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_call(call: Callable[[], Any], device: torch.device, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``call()`` after ``warmup`` untimed calls (CUDA work waited for)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        call()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure_latency(net: AdaptiveNet, x: torch.Tensor, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of one forward of ``net`` (at its current depth) on ``x``."""
    return time_call(lambda: net(x), x.device, repeats=repeats, warmup=warmup)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``threads`` inside the scope, put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ort_session(model: bytes | str, threads: int, device: torch.device) -> Any:
    """An onnxruntime ``InferenceSession`` of ``model`` (bytes or a path) on its CPU provider with ``threads``
    intra-op threads and one inter-op thread."""
    if device.type != "cpu":
        raise ValueError(f"--runtime onnxruntime is timed on its CPU provider here; use --device cpu, not {device}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("--runtime onnxruntime needs the onnxruntime package: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def runtime_forward(
    net: AdaptiveNet, s: float, input_shape: Sequence[int], runtime: str, threads: int
) -> Callable[[torch.Tensor], Callable[[], Any]]:
    """``bind(x)`` -> a call running depth ``s`` in ``runtime`` on ``x``: eager, the adaptive net (the caller sets
    its depth); pt2, the ``torch.export`` program of the static sub-net; onnxruntime, a session of its ONNX export."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime == "eager":
        return lambda x: lambda: net(x)
    device = next(net.parameters()).device
    module = static_subnet(net, s).cpu()
    if runtime == "pt2":
        program = export_program(module, tuple(input_shape)).module().to(device)
        return lambda x: lambda: program(x)
    session = ort_session(onnx_program(module, tuple(input_shape)).model_proto.SerializeToString(), threads, device)
    name = session.get_inputs()[0].name

    def bind(x: torch.Tensor) -> Callable[[], Any]:
        feed = {name: x.cpu().numpy()}
        return lambda: session.run(None, feed)

    return bind


def profile_net(
    net: AdaptiveNet,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    accuracy: Mapping[float, float] | None = None,
    repeats: int = 20,
    warmup: int = 3,
    runtime: str = "eager",
    threads: int | None = None,
) -> Profile:
    """The cost profile of every depth of ``net``, timed in ``runtime`` with ``threads`` intra-op threads
    (None: PyTorch's current count)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    threads = threads if threads is not None else torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    costs = depth_costs(net, input_shape)
    depths = []
    try:
        with torch_threads(threads):
            for s in net.scaling_factors:
                with net.at_depth(s):
                    bind = runtime_forward(net, s, input_shape, runtime, threads)
                    lat = {
                        b: time_call(
                            bind(torch.randn(b, *input_shape, device=device)), device, repeats=repeats, warmup=warmup
                        )
                        for b in batch_sizes
                    }
                c = costs[s]
                depths.append(DepthProfile(s, c.blocks, c.gflops, c.params, lat, (accuracy or {}).get(s)))
    finally:
        net.train(was_training)
    return Profile(str(device), tuple(input_shape), tuple(depths), runtime, threads)
