"""Budget -> depth: the most accurate depth whose FLOPs, latency or parameters fit.

Latencies hold only for the runtime, threads and device the profile was measured in (``Profile.measured_in``):
``choice_line`` names them beside the choice, and ``latency_warning`` flags a profile whose latency does not fall
as the depth falls (measured on a busy machine, or with threads set wrong), whose latency budgets mislead.
"""

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
        limits = {"gflops": max_gflops, "latency_ms": max_latency_ms, "params": max_params}
        given = ", ".join(f"{k}<={v}" for k, v in limits.items() if v is not None)
        raise ValueError(
            f"no depth fits the budget ({given}); the cheapest, s={c.s}, needs {c.gflops:.4f} GFLOPs, {c.params:,} "
            "params" + (f", {lat:.3f} ms at batch {batch_size} in {profile.measured_in()}" if lat is not None else "")
        )
    return max(ok, key=lambda d: (d.accuracy if d.accuracy is not None else -1.0, d.s))


# a shallower depth measured more than this much slower than a deeper one is not noise: the profile is suspect
LATENCY_NOISE = 0.05


def choice_line(profile: Profile, d: DepthProfile, batch_size: int = 1) -> str:
    """``budget -> depth 0.5 (6 blocks, 0.0026 GFLOPs, 0.310 ms at batch 1 in onnxruntime, 1 thread, cpu, ...)``."""
    lat = d.latency_ms.get(batch_size)
    when = f"{lat:.3f} ms at batch {batch_size}" if lat is not None else f"no latency at batch {batch_size}"
    acc = f"top-1 {d.accuracy:.2f} %" if d.accuracy is not None else "top-1 not known"
    return (
        f"budget -> depth {d.s} ({d.blocks} blocks, {d.gflops:.4f} GFLOPs, {d.params:,} params, {acc}; "
        f"{when} in {profile.measured_in()})"
    )


def latency_warning(profile: Profile) -> str:
    """One line when, at some batch size, latency does not fall as the depth falls: a shallower depth took more
    than ``LATENCY_NOISE`` longer than a deeper one, or the shallowest took no less than the deepest; "" when the
    profile looks sound. Fewer blocks cannot take longer on an idle machine."""
    depths = sorted(profile.depths, key=lambda d: d.s)
    for b in sorted({b for d in depths for b in d.latency_ms}):
        row = [(d.s, d.latency_ms[b]) for d in depths if b in d.latency_ms]
        bad = [(lo, hi) for i, lo in enumerate(row) for hi in row[i + 1 :] if lo[1] > hi[1] * (1 + LATENCY_NOISE)]
        if not bad and len(row) > 1 and row[0][1] >= row[-1][1]:
            bad = [(row[0], row[-1])]
        if bad:
            (s_lo, ms_lo), (s_hi, ms_hi) = bad[0]
            return (
                f"latency does not fall with depth at batch {b} in {profile.measured_in()}: s={s_lo:g} took "
                f"{ms_lo:.3f} ms, s={s_hi:g} {ms_hi:.3f} ms; the machine was busy or its threads mis-set: "
                "profile again on an idle machine (--threads at most its cores)"
            )
    return ""
