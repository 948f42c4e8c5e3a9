"""The ablation report: per-run JSON records -> the ladder (means, stds), the targets, RESULTS.md and the figure.

Pure functions of the records and the spec's rows (``experiments/ablation.py`` runs the sweep and calls them).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ladder_spec import RUNGS, Row, Spec

EVAL_ONLY = ("train.eval_every", "train.eval_train")  # schedule keys that change what is measured, not the training
RUNG_TITLES = {
    "independent": "one net per depth, trained alone",
    "full_only": "full net only, truncated at inference, BN recalibrated",
    "self_learning": "+ sub-nets distil from the full net",
    "sfsl": "+ scaling-factor-sensitive loss",
    "interactive": "+ second Teammate",
    "ctf": "+ Leader: the full CTF",
}

# ---------------------------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the known values; std None below two values."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None


def _row_summary(row: Row, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    recs = sorted(records, key=lambda r: r["seed"])
    depths = sorted({d for r in recs for d in r["top1"]}, key=float)
    top1 = {d: [r["top1"].get(d) for r in recs] for d in depths}
    gflops = {d: next((r["gflops"][d] for r in recs if r["gflops"].get(d) is not None), None) for d in depths}
    stats = {d: mean_std(v) for d, v in top1.items()}
    out = {
        "seeds": [r["seed"] for r in recs],
        "top1": top1,
        "train_seconds": [r.get("train_seconds") for r in recs],
        "wall_seconds": [r.get("wall_seconds") for r in recs],
        "gflops": gflops,
        "mean": {d: m for d, (m, _) in stats.items()},
        "std": {d: s for d, (_, s) in stats.items()},
    }
    if all("train_top1" in r for r in recs):  # train.eval_train runs: how well each depth fits (fit_summary)
        out["train_top1"] = {d: [r["train_top1"].get(d) for r in recs] for d in depths}
    return out


def fit_summary(summary: Mapping[str, Any], depth: str) -> tuple[tuple[float | None, float | None], ...]:
    """(mean, std) over seeds of the training-set top-1 at ``depth``, and of train minus val seed by seed (the
    generalisation gap); ((None, None),) * 2 where the row's runs did not record it."""
    train = summary.get("train_top1", {}).get(depth)
    if not train:
        return (None, None), (None, None)
    val = summary["top1"][depth]
    gaps = [t - v if t is not None and v is not None else None for t, v in zip(train, val, strict=True)]
    return mean_std(train), mean_std(gaps)


def aggregate(spec: Spec, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """ladder.json: per rung (and per variant) the per-seed top-1 at each depth, train times, GFLOPs, mean/std.

    Only the spec's rows and seeds count; a row without any result is left out.
    """
    out: dict[str, Any] = {
        "command": spec.command,
        "schedule": spec.schedule,
        "seeds": list(spec.seeds),
        "rungs": {},
        "variants": {},
    }
    for row in spec.rows:
        recs = [r for r in records if r.get("name") == row.name and r.get("seed") in row.seeds]
        if not recs:
            continue
        summary = _row_summary(row, recs)
        if row.rung is not None:
            out["rungs"][row.name] = {"config": row.config, **summary}
        else:
            out["variants"][row.name] = {
                "config": row.config,
                "overrides": row.overrides,
                "note": row.note,
                "against": row.against,
                **summary,
            }
    return out


def on_seeds(summary: Mapping[str, Any], seeds: Sequence[int]) -> dict[str, Any] | None:
    """``summary`` restricted to ``seeds`` (mean and std recomputed); None if it has none of them."""
    keep = [i for i, s in enumerate(summary["seeds"]) if s in seeds]
    if not keep:
        return None
    top1 = {d: [v[i] for i in keep] for d, v in summary["top1"].items()}
    stats = {d: mean_std(v) for d, v in top1.items()}
    fit = (
        {"train_top1": {d: [v[i] for i in keep] for d, v in summary["train_top1"].items()}}
        if "train_top1" in summary
        else {}
    )
    return {
        **summary,
        **fit,
        "seeds": [summary["seeds"][i] for i in keep],
        "top1": top1,
        "mean": {d: m for d, (m, _) in stats.items()},
        "std": {d: s for d, (_, s) in stats.items()},
    }


def difference(a: Mapping[str, Any], b: Mapping[str, Any], depth: str) -> tuple[float | None, float | None]:
    """Mean of a minus mean of b at ``depth``, and its standard error sqrt(s_a^2/n_a + s_b^2/n_b)."""
    if depth not in a["mean"] or depth not in b["mean"] or a["mean"][depth] is None or b["mean"][depth] is None:
        return None, None
    diff = a["mean"][depth] - b["mean"][depth]
    sa, sb = a["std"][depth], b["std"][depth]
    if sa is None or sb is None:
        return diff, None
    na, nb = (sum(v is not None for v in row["top1"][depth]) for row in (a, b))
    return diff, math.sqrt(sa**2 / na + sb**2 / nb)


# ---------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    label: str
    goal: str
    met: bool | None  # None: not checked (a rung has no results)
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not checked"}[self.met]


def check_targets(ladder: Mapping[str, Any]) -> list[Target]:
    """The sweep's three targets, from the ladder's per-depth means."""
    rungs = ladder["rungs"]
    ctf, full, ind = rungs.get("ctf"), rungs.get("full_only"), rungs.get("independent")
    goals = (
        "CTF Teammate A at s=1 at most 0.5 points below the full-depth-only net",
        "CTF at least as accurate as independent nets at every depth",
        "CTF top-1 rising with depth",
    )

    def missing(*names: str) -> str:
        return "no results for " + ", ".join(n for n in names if n not in rungs)

    if ctf is None or full is None or "1.0" not in ctf["mean"] or "1.0" not in full["mean"]:
        a = Target("a", goals[0], None, missing("ctf", "full_only") if ctf is None or full is None else "no s=1")
    else:
        c, f = ctf["mean"]["1.0"], full["mean"]["1.0"]
        a = Target("a", goals[0], c >= f - 0.5, f"CTF {c:.2f} vs full-only {f:.2f} (need >= {f - 0.5:.2f})")
    if ctf is None or ind is None:
        b = Target("b", goals[1], None, missing("ctf", "independent"))
    else:
        depths = [d for d in ctf["mean"] if d in ind["mean"]]
        diffs = {d: ctf["mean"][d] - ind["mean"][d] for d in depths}
        detail = ", ".join(f"s={d}: {ctf['mean'][d]:.2f} vs {ind['mean'][d]:.2f} ({diffs[d]:+.2f})" for d in depths)
        b = Target("b", goals[1], bool(depths) and all(x >= 0 for x in diffs.values()), detail)
    if ctf is None:
        c_ = Target("c", goals[2], None, missing("ctf"))
    else:
        means = [ctf["mean"][d] for d in ctf["mean"]]
        rising = all(x <= y for x, y in zip(means, means[1:]))
        detail = ", ".join(f"s={d}: {m:.2f}" for d, m in ctf["mean"].items())
        c_ = Target("c", goals[2], rising, detail)
    return [a, b, c_]


def closest(ladder: Mapping[str, Any], min_seeds: int = 3) -> tuple[str, dict[str, float], list[Target]] | None:
    """The cooperative row (rung or variant, >= ``min_seeds`` seeds) whose worst depth is nearest the nets trained
    alone: the largest min over depths of (its mean - ``independent``'s mean on the same seeds). A variant made
    with the config of the ``independent`` or ``full_only`` rung (a rerun of a baseline) is not a candidate.

    Returns its name, those differences, and the three targets checked for it against ``independent`` and
    ``full_only`` on its seeds; None without ``independent`` or without such a row.
    """
    rungs = ladder["rungs"]
    if "independent" not in rungs:
        return None
    rows = {**rungs, **ladder.get("variants", {})}
    baselines = {rungs[r].get("config") for r in ("independent", "full_only") if r in rungs} - {None}
    best: tuple[float, str, dict[str, float]] | None = None
    for name, row in rows.items():
        if name in ("independent", "full_only") or row.get("config") in baselines or len(row["seeds"]) < min_seeds:
            continue
        ind = on_seeds(rungs["independent"], row["seeds"])
        if ind is None or len(ind["seeds"]) < len(row["seeds"]):
            continue
        diffs = {d: difference(row, ind, d)[0] for d in row["mean"]}
        known = {d: x for d, x in diffs.items() if x is not None}
        if known and (best is None or min(known.values()) > best[0]):
            best = (min(known.values()), name, known)
    if best is None:
        return None
    _, name, diffs = best
    seeds = rows[name]["seeds"]
    own = {r: on_seeds(rungs[r], seeds) for r in ("independent", "full_only") if r in rungs}
    targets = check_targets({"rungs": {**{r: v for r, v in own.items() if v is not None}, "ctf": rows[name]}})
    return name, diffs, targets


def regime_row(ladder: Mapping[str, Any]) -> dict[str, Any]:
    """One ladder's line in the table of every ladder: its schedule, CTF's seeds, CTF Teammate A minus the nets
    trained alone per depth and minus the plain net at s=1 (differences of the means, as the targets use them),
    and its three targets."""
    rungs = ladder["rungs"]
    ctf, ind, full = (rungs.get(r) for r in ("ctf", "independent", "full_only"))
    vs_ind = {d: difference(ctf, ind, d)[0] for d in ctf["mean"]} if ctf and ind else {}
    vs_full = difference(ctf, full, "1.0")[0] if ctf and full else None
    return {
        "schedule": ladder["schedule"],
        "seeds": len(ctf["seeds"]) if ctf else 0,
        "vs_independent": vs_ind,
        "vs_plain": vs_full,
        "targets": check_targets(ladder),
    }


# ---------------------------------------------------------------------------------------------- markdown


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    """``mean ± std`` ("—" for an unknown mean or std); ``signed`` for differences."""
    if mean is None:
        return "—"
    return (f"{mean:+.2f}" if signed else f"{mean:.2f}") + (f" ± {std:.2f}" if std is not None else " ± —")


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def _minutes(summary: Mapping[str, Any]) -> str:
    train = [s for s in summary["train_seconds"] if s is not None]
    if train:
        return f"{statistics.fmean(train) / 60:.1f}"
    wall = [s for s in summary["wall_seconds"] if s is not None]
    return f"{statistics.fmean(wall) / 60:.1f}†" if wall else "—"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _depths(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted({d for r in rows for d in r["mean"]}, key=float)


def render_markdown(
    ladder: Mapping[str, Any],
    targets: Sequence[Target],
    *,
    generated_by: str,
    source: str = "experiments/records/8k/*.json",
    notes: str | None = None,
    recipes: str | None = None,
    warnings: Sequence[str] = (),
    notes_path: str = "docs/results/8k/notes.md",
    others: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> str:
    """docs/results/8k/RESULTS.md from ladder.json's content (pure: no file is read here); ``notes_path`` is where the
    hand-written discussion it inserts lives; ``others`` are (link to its page, ladder) of the spec's other
    ladders, whose targets are stated beside this one's."""
    rungs, variants = ladder["rungs"], ladder.get("variants", {})
    depths = _depths([*rungs.values(), *variants.values()])
    schedule = (
        ", ".join(f"`{k}={v if isinstance(v, str) else json.dumps(v)}`" for k, v in ladder["schedule"].items())
        or "the configs' own"
    )
    seeds = ", ".join(str(s) for s in ladder.get("seeds", [])) or "—"
    lines = [
        "# Ablation ladder results",
        "",
        f"_Generated by `{generated_by}` from `{source}`; do not edit "
        f"(the discussion is written by hand in `{notes_path}` and inserted below)._",
        "",
        "The ladder adds one ingredient of cooperative training per rung, from one net trained alone per depth up "
        "to the full cooperative framework (CTF): "
        + "; ".join(f"**{r}** ({RUNG_TITLES[r]})" for r in RUNGS)
        + ". Every rung uses its config in `experiments/configs/` with the same schedule "
        f"({schedule}), seeds {seeds}; the reported net is Teammate A (for `independent`, the net of each depth; "
        "for `full_only`, the plain net truncated with BN recalibrated). Top-1 is % on the validation set, "
        f"`mean ± std` over seeds (sample std). Command: `{ladder['command']}`.",
        "",
        "## Targets",
        "",
    ]
    failed = [t for t in targets if t.met is not True]
    if failed:
        lines.append(
            f"**Not all targets are met:** {', '.join(f'({t.label}) {t.verdict}' for t in failed)}.",
        )
    else:
        lines.append("All targets are met.")
    lines += ["", *(f"- ({t.label}) {t.goal}: **{t.verdict}** — {t.detail}" for t in targets), ""]
    near = closest(ladder) if failed else None
    if near is not None:
        name, diffs, own = near
        lines += [
            f"**Closest configuration found:** `{name}` (of the rows with >= 3 seeds, the one whose worst depth is "
            "nearest the nets trained alone, on its own seeds): "
            + ", ".join(f"s={d}: {x:+.2f}" for d, x in diffs.items())
            + "; its targets: "
            + ", ".join(f"({t.label}) {t.verdict}" for t in own)
            + ".",
            "",
        ]
    if others:
        lines += [
            "**The same targets on the other ladders** (the same rungs on another schedule, each page made by its "
            "own sweep; CTF Teammate A minus the nets trained alone and minus the plain net, differences of the "
            "means over the seeds each page has):",
            "",
        ]
        header = ["ladder", "schedule", "CTF seeds", *(f"A − alone s={d}" for d in depths), "A − plain s=1", "targets"]
        body = []
        for link, other in [("this page", ladder), *((f"[{p}]({p})", o) for p, o in others)]:
            row = regime_row(other)
            sched = ", ".join(f"`{k}={v}`" for k, v in row["schedule"].items() if k not in EVAL_ONLY)
            body.append(
                [
                    link,
                    sched or "—",
                    str(row["seeds"]),
                    *(_signed(row["vs_independent"].get(d)) for d in depths),
                    _signed(row["vs_plain"]),
                    ", ".join(f"({t.label}) {t.verdict}" for t in row["targets"]),
                ]
            )
        lines += [*_table(header, body), ""]
    lines += [line for w in warnings for line in (f"**Warning:** {w}", "")]

    lines += ["## The ladder", ""]
    if not rungs:
        lines += ["No results yet.", ""]
    header = ["rung", "seeds (n)", *(f"top-1 s={d}" for d in depths), "train min", *(f"GFLOPs s={d}" for d in depths)]
    body = []
    for name, r in rungs.items():
        gf = [f"{r['gflops'][d]:.4f}" if r["gflops"].get(d) is not None else "—" for d in depths]
        acc = [_pm(r["mean"].get(d), r["std"].get(d)) for d in depths]
        body.append([name, str(len(r["seeds"])), *acc, _minutes(r), *gf])
    if rungs:
        lines += _table(header, body)
        lines += [
            "",
            "Train min: mean training time per run († where runs did not report it: wall-clock of the whole run).",
            "",
        ]
    if "independent" in rungs:
        ind = rungs["independent"]
        lines += [
            "Difference to `independent` (points of top-1; ± is the standard error of the difference, "
            "sqrt(s_a²/n_a + s_b²/n_b), — with a single seed):",
            "",
        ]
        diff_rows = [
            [name, *(_pm(*difference(r, ind, d), signed=True) for d in depths)]
            for name, r in rungs.items()
            if name != "independent"
        ]
        lines += [*_table(["rung", *(f"Δ s={d}" for d in depths)], diff_rows), ""]

    lines += ["## Recipe variants tried", ""]
    if variants:
        header = [
            "variant",
            "note",
            "seeds (n)",
            *(f"top-1 s={d}" for d in depths),
            "against",
            *(f"Δ s={d}" for d in depths),
        ]
        body = []
        for name, v in variants.items():
            against = v.get("against", "ctf")
            base = {**rungs, **variants}.get(against)
            base = on_seeds(base, v["seeds"]) if base else None
            acc = [_pm(v["mean"].get(d), v["std"].get(d)) for d in depths]
            dif = [_pm(*difference(v, base, d), signed=True) if base else "—" for d in depths]
            body.append([name, v["note"] or "—", str(len(v["seeds"])), *acc, against, *dif])
        lines += [*_table(header, body), ""]
    else:
        lines += ["None yet.", ""]
    fitted = {name: r for name, r in {**rungs, **variants}.items() if "train_top1" in r}
    if fitted:
        lines += [
            "## How well each depth fits",
            "",
            "The rows run with `train.eval_train`: top-1 % on the training samples without augmentation, and train "
            "minus val seed by seed (the generalisation gap), `mean ± std` over seeds. A row that fits less than "
            "another with no smaller gap trails it for want of fit, not of generalisation.",
            "",
        ]
        body = []
        for name, r in fitted.items():
            fit = [fit_summary(r, d) for d in depths]
            body.append(
                [name, str(len(r["seeds"])), *(_pm(*t) for t, _ in fit), *(_pm(*g, signed=True) for _, g in fit)]
            )
        header = ["row", "seeds (n)", *(f"train s={d}" for d in depths), *(f"train − val s={d}" for d in depths)]
        lines += [*_table(header, body), ""]
    for text in (notes, recipes):
        if text and text.strip():
            lines += [text.rstrip("\n"), ""]
    lines += ["## Accuracy vs compute", "", "![accuracy vs GFLOPs](ladder.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figure


def plot_ladder(ladder: Mapping[str, Any], path: str | Path) -> Path:
    """Top-1 (mean, std error bars) vs GFLOPs per image: a line per rung (the variants are in RESULTS.md's
    tables). The y axis spans the rungs other than ``full_only`` (whose truncated shallow depths sit tens of
    points lower); a point below it is drawn on the axis with its value written next to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colors = {name: f"C{i}" for i, name in enumerate(RUNGS)}  # a rung keeps its colour across reports
    points = {
        name: [(r["gflops"][d], r["mean"][d], r["std"][d] or 0.0, d) for d in sorted(r["mean"], key=float)]
        for name, r in ladder["rungs"].items()
    }
    points = {name: [p for p in pts if p[0] is not None and p[1] is not None] for name, pts in points.items()}
    span = [y - e for name, pts in points.items() if name != "full_only" for _, y, e, _ in pts]
    top = [y + e for pts in points.values() for _, y, e, _ in pts]
    low = math.floor(min(span) - 1.0) if span else None
    for name, pts in points.items():
        if not pts:
            continue
        xs, ys, es, ds = zip(*pts, strict=True)
        off = [low is not None and y < low for y in ys]  # drawn on the axis, without an error bar
        shown = [low if o else y for y, o in zip(ys, off, strict=True)]
        bars = [0.0 if o else e for e, o in zip(es, off, strict=True)]
        ax.errorbar(xs, shown, yerr=bars, marker="o", capsize=3, label=name, color=colors.get(name))
        for x, y, d, o in zip(xs, ys, ds, off, strict=True):
            if o:
                ax.annotate(f"{name} s={float(d):g}: {y:.1f}", (x, low), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=colors.get(name))  # fmt: skip
            elif name == "ctf":
                ax.annotate(f"s={float(d):g}", (x, y), textcoords="offset points", xytext=(3, -12), fontsize=7)
    if low is not None and top:
        ax.set_ylim(low, math.ceil(max(top) + 0.5))
    ax.set_xlabel("GFLOPs per image (forward)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("ablation ladder: top-1 vs compute per depth (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # an empty sweep still gets its (empty) figure
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
