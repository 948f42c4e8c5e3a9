"""Budget -> depth: the most accurate depth whose FLOPs, latency or parameters fit."""

from __future__ import annotations

from dist_coop.infer.profile import DepthProfile, Profile


def choose_depth(
    profile: Profile,
    *,
    max_gflops: float | None = None,
    max_latency_ms: float | None = None,
    max_params: int | None = None,
    batch_size: int = 1,
) -> DepthProfile:
    """The most accurate depth within every given limit (ties, or no accuracies: the deepest that fits).

    A ``ValueError`` names the cheapest depth when nothing fits.
    """
    if max_gflops is None and max_latency_ms is None and max_params is None:
        raise ValueError("give a budget: max_gflops, max_latency_ms and/or max_params")

    def fits(d: DepthProfile) -> bool:
        if max_gflops is not None and d.gflops > max_gflops:
            return False
        if max_params is not None and d.params > max_params:
            return False
        if max_latency_ms is not None:
            if batch_size not in d.latency_ms:
                raise ValueError(f"the profile has no latency at batch {batch_size} (has {sorted(d.latency_ms)})")
            if d.latency_ms[batch_size] > max_latency_ms:
                return False
        return True

    ok = [d for d in profile.depths if fits(d)]
    if not ok:
        c = min(profile.depths, key=lambda d: d.gflops)
        lat = c.latency_ms.get(batch_size)
        raise ValueError(
            f"no depth fits the budget (gflops<={max_gflops}, latency_ms<={max_latency_ms}, params<={max_params}); "
            f"the cheapest, s={c.s}, needs {c.gflops:.4f} GFLOPs, {c.params:,} params"
            + (f", {lat:.3f} ms at batch {batch_size}" if lat is not None else "")
        )
    return max(ok, key=lambda d: (d.accuracy if d.accuracy is not None else -1.0, d.s))
