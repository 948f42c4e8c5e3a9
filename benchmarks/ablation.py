"""The ablation sweep: every ladder rung and recipe variant x seeds, resumable, and the report made from it.

    python benchmarks/ablation.py run --spec configs/ablation/ladder.yaml --jobs 2 [--only ctf,sfsl] [--set train.epochs=1]
    python benchmarks/ablation.py report --spec configs/ablation/ladder.yaml

`run` trains each (row, seed) pair that has no per-run JSON yet (`docs/results/runs/<name>_s<seed>.json`, written
atomically after the run succeeds, so a killed or crashed run is simply retried), keeps only that JSON (the run's
checkpoints are deleted) and ends with `report`. `report` turns the per-run JSON into `docs/results/ladder.json`,
`docs/results/ladder.png` and `docs/RESULTS.md`. The spec (plain YAML) is data: the schedule applied to every run,
the seeds, the rung configs and the recipe variants; see configs/ablation/ladder.yaml.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RUNGS = ("independent", "full_only", "self_learning", "sfsl", "interactive", "ctf")
RUNG_TITLES = {
    "independent": "one net per depth, trained alone",
    "full_only": "full net only, truncated at inference, BN recalibrated",
    "self_learning": "+ sub-nets distil from the full net",
    "sfsl": "+ scaling-factor-sensitive loss",
    "interactive": "+ second Teammate",
    "ctf": "+ Leader: the full CTF",
}
REPORTED_NETS = ("teammate_a", "independent")  # the first one a run has is the one reported
SPEC_KEYS = ("command", "schedule", "seeds", "rungs", "variants")
VARIANT_KEYS = ("name", "config", "overrides", "seeds", "note")
TAIL_LINES = 40


# ---------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Row:
    """One line of the results: a ladder rung (``rung`` set) or a recipe variant (``rung`` None)."""

    name: str
    config: str
    rung: str | None
    seeds: tuple[int, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Spec:
    command: str
    schedule: dict[str, Any]
    seeds: tuple[int, ...]
    rows: tuple[Row, ...]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def _nearest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {list(valid)}"


def _seeds(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of integers, got {value!r}")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in value):
        raise ValueError(f"{where} must hold integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where} has a seed twice: {value!r}")
    return tuple(value)


def _settings(where: str, value: Any) -> dict[str, Any]:
    """A mapping of ``section.key`` -> value (what the training CLI takes as ``--section.key=value``)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of section.key: value, got {type(value).__name__}")
    for key, v in value.items():
        if not isinstance(key, str) or key.count(".") != 1 or not all(key.split(".")):
            raise ValueError(f"{where}: keys look like section.key (e.g. train.epochs), got {key!r}")
        if isinstance(v, Mapping):
            raise ValueError(f"{where}.{key}: a value must be a scalar or a list, got a mapping")
    return dict(value)


def _config(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.endswith((".yaml", ".yml")):
        raise ValueError(f"{where} must be the path of a YAML config, got {value!r}")
    return value


def parse_spec(data: Any, sets: Mapping[str, Any] | None = None) -> Spec:
    """Validate a spec mapping (as read from YAML); ``sets`` override schedule entries (``--set``)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a sweep spec must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in SPEC_KEYS:
            raise ValueError(f"unknown spec key {key!r}{_nearest(str(key), SPEC_KEYS)}")
    command = data.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ValueError("command must be the sweep's command line (a non-empty string), recorded in ladder.json")
    schedule = {**_settings("schedule", data.get("schedule")), **_settings("--set", sets)}
    if "seeds" not in data:
        raise ValueError("seeds is missing (a list such as [0, 1, 2])")
    seeds = _seeds("seeds", data["seeds"])
    rungs = data.get("rungs")
    if not isinstance(rungs, Mapping) or not rungs:
        raise ValueError(f"rungs must be a non-empty mapping of rung name -> config; names: {list(RUNGS)}")
    rows = []
    for name in sorted(rungs, key=lambda n: RUNGS.index(n) if n in RUNGS else -1):
        if name not in RUNGS:
            raise ValueError(f"rungs: unknown rung {name!r}{_nearest(str(name), RUNGS)}")
        value, overrides = rungs[name], {}
        if isinstance(value, Mapping):  # {config: ..., overrides: {...}}
            unknown = set(value) - {"config", "overrides"}
            if unknown or "config" not in value:
                raise ValueError(f"rungs.{name} must be a config path or a mapping with config (and overrides)")
            value, overrides = value["config"], _settings(f"rungs.{name}.overrides", value.get("overrides"))
        config = _config(f"rungs.{name}", value)
        rows.append(Row(name=name, config=config, rung=name, seeds=seeds, overrides=overrides))
    variants = data.get("variants") or []
    if not isinstance(variants, list):
        raise ValueError(f"variants must be a list of mappings, got {type(variants).__name__}")
    for i, v in enumerate(variants):
        where = f"variants[{i}]"
        if not isinstance(v, Mapping):
            raise ValueError(f"{where} must be a mapping with keys {list(VARIANT_KEYS)}, got {v!r}")
        for key in v:
            if key not in VARIANT_KEYS:
                raise ValueError(f"{where}: unknown key {key!r}{_nearest(str(key), VARIANT_KEYS)}")
        name = v.get("name")
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}.name must be a non-empty name of letters, digits, '_' or '-', got {name!r}")
        where = f"variants.{name}"
        if name in RUNGS or any(r.name == name for r in rows):
            raise ValueError(f"{where}: the name is already used by a rung or another variant")
        if "config" not in v:
            raise ValueError(f"{where}.config is missing")
        note = v.get("note", "")
        if not isinstance(note, str):
            raise ValueError(f"{where}.note must be a string, got {note!r}")
        rows.append(
            Row(
                name=name,
                config=_config(f"{where}.config", v["config"]),
                rung=None,
                seeds=_seeds(f"{where}.seeds", v["seeds"]) if "seeds" in v else seeds,
                overrides=_settings(f"{where}.overrides", v.get("overrides")),
                note=note,
            )
        )
    return Spec(command=command, schedule=schedule, seeds=seeds, rows=tuple(rows))


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=1"]`` -> ``{"train.epochs": 1}`` (values read as YAML, like the training CLI does)."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"--set takes section.key=value, got {item!r}")
        out[key.removeprefix("--")] = yaml.safe_load(text) if text else ""
    return out


def load_spec(path: str | Path, sets: Mapping[str, Any] | None = None) -> Spec:
    """Read and validate a spec file; every config it names must exist."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"spec file not found: {path}")
    spec = parse_spec(yaml.safe_load(path.read_text()), sets)
    for row in spec.rows:
        if not Path(row.config).is_file():
            raise ValueError(f"{row.name}: config file not found: {row.config}")
    return spec


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    name: str
    rung: str | None
    seed: int
    config: str
    settings: dict[str, Any]  # schedule, then the row's overrides: what defines the experiment

    @property
    def key(self) -> str:
        return f"{self.name}_s{self.seed}"

    def overrides(self, out_dir: str | Path, threads: int) -> list[str]:
        """The full list of ``--section.key=value`` passed to ``dist_coop.cli train``."""
        fixed = {
            "train.seed": self.seed,
            "train.run_name": self.key,
            "train.out_dir": str(out_dir),
            "tracking.backend": "none",
            "train.progress": False,
            "train.threads": threads,
        }
        return [f"--{k}={_cli_value(v)}" for k, v in {**fixed, **self.settings}.items()]


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # JSON is YAML: the CLI reads it back


def build_jobs(spec: Spec, only: Sequence[str] = ()) -> list[Job]:
    """Every (row, seed) pair, seed-major: all rows' first seed before any second seed."""
    names = [r.name for r in spec.rows]
    for name in only:
        if name not in names:
            raise ValueError(f"--only: no rung or variant {name!r}{_nearest(name, names)}")
    rows = [r for r in spec.rows if not only or r.name in only]
    seeds = sorted({s for r in rows for s in r.seeds})
    return [
        Job(r.name, r.rung, s, r.config, {**spec.schedule, **r.overrides}) for s in seeds for r in rows if s in r.seeds
    ]


def record_path(results_dir: str | Path, job: Job) -> Path:
    return Path(results_dir) / f"{job.key}.json"


def pending(jobs: Sequence[Job], results_dir: str | Path) -> list[Job]:
    """The jobs without a per-run JSON (a finished pair is never run again)."""
    return [j for j in jobs if not record_path(results_dir, j).is_file()]


def stale(jobs: Sequence[Job], results_dir: str | Path) -> list[str]:
    """Finished pairs whose JSON was made with another config or settings than the spec now says."""
    out = []
    for job in jobs:
        path = record_path(results_dir, job)
        if path.is_file():
            rec = json.loads(path.read_text())
            if rec.get("config") != job.config or rec.get("settings") != job.settings:
                out.append(job.key)
    return out


# ---------------------------------------------------------------------------------------------- records


def _depth_key(metric: str) -> tuple[str, str]:
    net, _, depth = metric.rpartition("@")
    return net, depth


def run_record(job: Job, results: Mapping[str, Any], overrides: Sequence[str], wall_seconds: float) -> dict[str, Any]:
    """The small per-run JSON from a run's ``results.json`` dict."""
    metrics, costs = results["metrics"], results.get("costs", {})
    acc1 = {k.removeprefix("val/acc1/"): float(v) for k, v in metrics.items() if k.startswith("val/acc1/")}
    nets = {_depth_key(m)[0] for m in acc1}
    net = next((n for n in REPORTED_NETS if n in nets), None)
    if net is None:
        raise ValueError(f"{job.key}: results have none of the nets {list(REPORTED_NETS)} (found {sorted(nets)})")
    depths = sorted((_depth_key(m)[1] for m in acc1 if _depth_key(m)[0] == net), key=float)
    return {
        "name": job.name,
        "rung": job.rung,
        "seed": job.seed,
        "config": job.config,
        "settings": job.settings,
        "overrides": list(overrides),
        "net": net,
        "top1": {d: acc1[f"{net}@{d}"] for d in depths},
        "all_top1": acc1,
        "gflops": {d: costs.get(f"cost/gflops/{net}@{d}") for d in depths},
        "train_seconds": results.get("train_seconds"),
        "wall_seconds": round(wall_seconds, 1),
        "step": results.get("step"),
    }


def write_json(path: str | Path, data: Any) -> None:
    """Write atomically: a reader (or a resumed sweep) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]


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
    return {
        "seeds": [r["seed"] for r in recs],
        "top1": top1,
        "train_seconds": [r.get("train_seconds") for r in recs],
        "wall_seconds": [r.get("wall_seconds") for r in recs],
        "gflops": gflops,
        "mean": {d: m for d, (m, _) in stats.items()},
        "std": {d: s for d, (_, s) in stats.items()},
    }


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
            out["rungs"][row.name] = summary
        else:
            out["variants"][row.name] = {
                "config": row.config,
                "overrides": row.overrides,
                "note": row.note,
                **summary,
            }
    return out


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


# ---------------------------------------------------------------------------------------------- markdown


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    """``mean ± std`` ("—" for an unknown mean or std); ``signed`` for differences."""
    if mean is None:
        return "—"
    return (f"{mean:+.2f}" if signed else f"{mean:.2f}") + (f" ± {std:.2f}" if std is not None else " ± —")


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
    source: str = "docs/results/runs/*.json",
    notes: str | None = None,
    recipes: str | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """docs/RESULTS.md from ladder.json's content (pure: no file is read here)."""
    rungs, variants = ladder["rungs"], ladder.get("variants", {})
    depths = _depths([*rungs.values(), *variants.values()])
    schedule = ", ".join(f"`{k}={_cli_value(v)}`" for k, v in ladder["schedule"].items()) or "the configs' own"
    seeds = ", ".join(str(s) for s in ladder.get("seeds", [])) or "—"
    lines = [
        "# Ablation ladder results",
        "",
        f"_Generated by `{generated_by}` from `{source}`; do not edit "
        "(the discussion is written by hand in `docs/results/notes.md` and inserted below)._",
        "",
        "The ladder adds one ingredient of cooperative training per rung, from one net trained alone per depth up "
        "to the full cooperative framework (CTF): "
        + "; ".join(f"**{r}** ({RUNG_TITLES[r]})" for r in RUNGS)
        + ". Every rung uses its config in `configs/ablation/` with the same schedule "
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
        ctf = rungs.get("ctf")
        header = ["variant", "note", "seeds (n)", *(f"top-1 s={d}" for d in depths), *(f"Δ ctf s={d}" for d in depths)]
        body = []
        for name, v in variants.items():
            acc = [_pm(v["mean"].get(d), v["std"].get(d)) for d in depths]
            dif = [_pm(*difference(v, ctf, d), signed=True) if ctf else "—" for d in depths]
            body.append([name, v["note"] or "—", str(len(v["seeds"])), *acc, *dif])
        lines += [*_table(header, body), ""]
    else:
        lines += ["None yet.", ""]
    for text in (notes, recipes):
        if text and text.strip():
            lines += [text.rstrip("\n"), ""]
    lines += ["## Accuracy vs compute", "", "![accuracy vs GFLOPs](results/ladder.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figure


def plot_ladder(ladder: Mapping[str, Any], path: str | Path) -> Path:
    """Top-1 (mean, std error bars) vs GFLOPs per image: a line per rung, variants dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    variants = ladder.get("variants", {})
    colors = {name: f"C{i}" for i, name in enumerate([*RUNGS, *variants])}  # a rung keeps its colour across reports
    for group, style in ((ladder["rungs"], "-"), (variants, "--")):
        for name, r in group.items():
            ds = [d for d in sorted(r["mean"], key=float) if r["gflops"].get(d) is not None]
            xs, ys = [r["gflops"][d] for d in ds], [r["mean"][d] for d in ds]
            yerr = [r["std"][d] or 0.0 for d in ds]
            ax.errorbar(xs, ys, yerr=yerr, marker="o", linestyle=style, capsize=3, label=name, color=colors[name])
            if name == "ctf":
                for d, x, y in zip(ds, xs, ys):
                    ax.annotate(f"s={float(d):g}", (x, y), textcoords="offset points", xytext=(3, -12), fontsize=7)
    ax.set_xlabel("GFLOPs per image (forward)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("ablation ladder: top-1 vs compute per depth (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # an empty sweep still gets its (empty) figure
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- commands


def report(spec: Spec, results_dir: str | Path, docs_dir: str | Path, generated_by: str) -> dict[str, Any]:
    """Write docs/results/ladder.json, docs/results/ladder.png and docs/RESULTS.md; return the ladder."""
    docs = Path(docs_dir)
    ladder = aggregate(spec, load_records(results_dir))
    write_json(docs / "results" / "ladder.json", ladder)
    plot_ladder(ladder, docs / "results" / "ladder.png")
    old = stale(build_jobs(spec), results_dir)
    warnings = [f"{len(old)} run(s) were made with another config or schedule than the spec: {', '.join(old)}"] * bool(
        old
    )
    extra = {
        n: (docs / "results" / n).read_text() if (docs / "results" / n).is_file() else None
        for n in ("notes.md", "recipes.md")
    }
    text = render_markdown(
        ladder,
        check_targets(ladder),
        generated_by=generated_by,
        source=f"{Path(results_dir).as_posix()}/*.json",
        notes=extra["notes.md"],
        recipes=extra["recipes.md"],
        warnings=warnings,
    )
    tmp = docs / ".RESULTS.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, docs / "RESULTS.md")
    return ladder


class Runner:
    """Runs jobs as ``dist_coop.cli train`` subprocesses, N at a time; kills its children when interrupted."""

    def __init__(self, results_dir: Path, work_dir: Path, threads: int):
        self.results_dir, self.work_dir, self.threads = results_dir, work_dir, threads
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, job: Job) -> dict[str, Any]:
        """Train ``job`` from scratch; on success write its JSON and delete its checkpoints. Raises on failure."""
        run_dir, log = self.work_dir / job.key, self.work_dir / f"{job.key}.log"
        shutil.rmtree(run_dir, ignore_errors=True)  # a killed earlier attempt: start over
        overrides = job.overrides(self.work_dir, self.threads)
        cmd = [sys.executable, "-m", "dist_coop.cli", "train", "--config", job.config, *overrides]
        env = dict(
            os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1"
        )
        t0 = time.perf_counter()
        with open(log, "w") as out:
            out.write(" ".join(cmd) + "\n")
            out.flush()
            with self.lock:
                if self.stopping:
                    raise RuntimeError("sweep interrupted")
                # its own session: a Ctrl-C reaches the sweep only, which then stops its children itself
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                self.live.add(proc)
            rc = proc.wait()
            with self.lock:
                self.live.discard(proc)
        results = run_dir / "results.json"
        if rc != 0 or not results.is_file():
            raise RuntimeError(f"exit code {rc}" if rc else "no results.json")
        record = run_record(job, json.loads(results.read_text()), overrides, time.perf_counter() - t0)
        write_json(record_path(self.results_dir, job), record)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return record

    def kill_all(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.live:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:  # it had just ended
                    pass


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else ["(no log)"]
    return "\n".join("    " + line for line in lines[-n:])


def preflight(jobs: Sequence[Job]) -> None:
    """Load every distinct config with its overrides now, so a typo fails before hours of training."""
    from dist_coop.config import load_config

    for job in {(j.config, json.dumps(j.settings, sort_keys=True)): j for j in jobs}.values():
        try:
            load_config(job.config, job.overrides("runs", 1))
        except ValueError as e:
            raise ValueError(f"{job.name}: {e}") from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the sweep like Ctrl-C: children killed, finished runs kept


def cmd_run(args: argparse.Namespace, spec: Spec, generated_by: str) -> int:
    only = [n for n in (args.only or "").split(",") if n]
    jobs = build_jobs(spec, only)
    todo = pending(jobs, args.results)
    old = stale(jobs, args.results)
    if old:
        print(f"warning: kept results made with another config or schedule (delete them to rerun): {', '.join(old)}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    print(
        f"{len(jobs) - len(todo)} of {len(jobs)} runs done; {len(todo)} to run, {args.jobs} at a time, "
        f"{threads} thread(s) each; logs in {args.runs_dir}/"
    )
    if args.dry_run:
        for job in todo:
            print(f"  {job.key}: --config {job.config} {' '.join(job.overrides(args.runs_dir, threads))}")
        return 0
    preflight(todo)
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    runner = Runner(Path(args.results), Path(args.runs_dir), threads)
    signal.signal(signal.SIGTERM, _interrupt)
    failed, done, futures = [], 0, {}
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = {pool.submit(runner.run, job): job for job in todo}
        for fut in as_completed(futures):
            job, done = futures[fut], done + 1
            try:
                rec = fut.result()
            except Exception as e:  # the sweep goes on; the pair stays pending
                failed.append(job.key)
                print(f"[{done}/{len(todo)}] {job.key} FAILED ({e}); log {args.runs_dir}/{job.key}.log:")
                print(_tail(Path(args.runs_dir) / f"{job.key}.log"), flush=True)
                continue
            acc = "  ".join(f"{float(d):g}: {v:.2f}" for d, v in rec["top1"].items())
            print(f"[{done}/{len(todo)}] {job.key}: {rec['wall_seconds'] / 60:.1f} min, top-1 {acc}", flush=True)
    except KeyboardInterrupt:
        for fut in futures:
            fut.cancel()
        runner.kill_all()
        pool.shutdown(wait=True)
        print("interrupted; finished runs are kept, rerun the same command to continue")
        return 130
    pool.shutdown(wait=True)
    report(spec, args.results, args.docs, generated_by)
    print(f"report written to {args.docs}/RESULTS.md")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--spec", required=True, help="sweep spec YAML (configs/ablation/ladder.yaml)")
        p.add_argument("--results", "--out", default=None, help="per-run JSON folder (default <docs>/results/runs)")
        p.add_argument("--docs", default="docs", help="where RESULTS.md and results/ladder.{json,png} go")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a schedule entry")
    run = sub.choices["run"]
    run.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    run.add_argument("--threads", type=int, default=0, help="torch threads per run (default cores // jobs)")
    run.add_argument("--only", default="", help="comma-separated rung / variant names")
    run.add_argument("--runs-dir", default="runs/ladder", help="training output and logs (checkpoints are deleted)")
    run.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    args = parser.parse_args(argv)
    args.results = args.results or str(Path(args.docs) / "results" / "runs")
    try:
        if args.command == "run" and args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        spec = load_spec(args.spec, parse_sets(args.set))
        sets = "".join(f" --set {s}" for s in args.set)
        dirs = f" --results {args.results}" * (args.results != str(Path("docs/results/runs")))
        dirs += f" --docs {args.docs}" * (args.docs != "docs")
        generated_by = f"python benchmarks/ablation.py report --spec {args.spec}{sets}{dirs}"
        if args.command == "run":
            return cmd_run(args, spec, generated_by)
        report(spec, args.results, args.docs, generated_by)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.docs}/RESULTS.md, {args.docs}/results/ladder.json, {args.docs}/results/ladder.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
