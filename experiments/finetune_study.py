"""Fine-tuning a trained plain net into a cost-adaptive one, measured against training from scratch.

    python experiments/finetune_study.py run --spec experiments/configs/finetune.yaml --jobs 2 --threads 1 [--only ROWS]
    python experiments/finetune_study.py report --spec experiments/configs/finetune.yaml

For each ladder of the spec (a schedule and the folder of that ladder's own run records), `run` trains

- the plain net (``plain``: one net at full depth, as the ladder's full_only rung) on every seed, keeping its
  checkpoints: the trained net a user already has;
- the four nets trained alone (``independent``) on a few seeds, for the cost comparison only (train time is
  measured in the same sweep, on the same machine and threads as the fine-tuning);
- every fine-tuning row, each seed's run started from that seed's plain net (``model.init``), after it.

Each (ladder, row, seed) keeps one JSON record (``<records>/<ladder>/<row>_s<seed>.json``, written after the run
succeeds; a pair with a record is not run again, so rerunning the command continues a stopped sweep). A plain net
whose checkpoints are gone while a fine-tuning row still needs them is trained again. `report` (run at the end of
`run` too) writes ``<docs>/finetune.json`` and the page ``<docs>/RESULTS.md``: the targets first, then accuracy per
depth against the ladder's nets trained alone, its truncated plain net and its CTF from scratch, paired
differences by seed, and the cost both ways (fine-tuning alone; plain training plus fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ablation import Job, Runner, preflight, write_json
from ablation_report import _pm, _table, mean_std
from ladder_spec import _check_keys, _settings, nearest

from dist_coop.checkpoint import latest_checkpoint

SPEC_KEYS = ("command", "docs", "records", "seeds", "ladders", "rows")
LADDER_KEYS = ("name", "title", "schedule", "records", "baselines", "rows")
ROW_KEYS = ("name", "config", "overrides", "seeds", "init_from", "keep", "stage", "note")
STAGES = ("source", "timing", "screen", "final")  # what a row is for (the page groups rows by it)
DEPTH_TARGET_ROW = "independent"  # the baseline every depth must match
PLAIN = "plain"


@dataclass(frozen=True)
class StudyRow:
    name: str
    config: str
    stage: str
    seeds: tuple[int, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a row of the same ladder whose run (same seed) gives model.init
    keep: bool = False  # keep the run's checkpoints (a source of other rows)
    note: str = ""


@dataclass(frozen=True)
class Ladder:
    name: str
    title: str
    schedule: dict[str, Any]
    records: str  # the ladder's own per-run JSON folder (its baselines)
    baselines: dict[str, str]  # page label -> the ladder's row name
    rows: tuple[StudyRow, ...]


@dataclass(frozen=True)
class Study:
    command: str
    docs: str  # the page folder: RESULTS.md, finetune.json
    records: str  # the per-run JSON: <records>/<ladder>/<row>_s<seed>.json
    ladders: tuple[Ladder, ...]


def _row(where: str, v: Any, seeds: tuple[int, ...]) -> StudyRow:
    if not isinstance(v, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {list(ROW_KEYS)}")
    _check_keys(where, v, ROW_KEYS)
    stage = v.get("stage", "final")
    if stage not in STAGES:
        raise ValueError(f"{where}.stage must be one of {list(STAGES)}, got {stage!r}")
    for key in ("name", "config"):
        if not isinstance(v.get(key), str) or not v[key]:
            raise ValueError(f"{where}.{key} must be a non-empty string")
    return StudyRow(
        name=v["name"],
        config=v["config"],
        stage=stage,
        seeds=tuple(int(s) for s in v.get("seeds", seeds)),
        overrides=_settings(f"{where}.overrides", v.get("overrides")),
        init_from=v.get("init_from"),
        keep=bool(v.get("keep", False)),
        note=str(v.get("note", "")),
    )


def parse_study(data: Any) -> Study:
    if not isinstance(data, Mapping):
        raise ValueError("a study spec must be a mapping")
    _check_keys("spec", data, SPEC_KEYS)
    seeds = tuple(int(s) for s in data.get("seeds", ()))
    if not seeds:
        raise ValueError("seeds must be a non-empty list")
    common = [_row(f"rows[{i}]", v, seeds) for i, v in enumerate(data.get("rows") or [])]
    ladders = []
    for i, lad in enumerate(data.get("ladders") or []):
        where = f"ladders[{i}]"
        _check_keys(where, lad, LADDER_KEYS)
        own = [_row(f"{where}.rows[{j}]", v, seeds) for j, v in enumerate(lad.get("rows") or [])]
        rows = tuple(common + own)
        names = [r.name for r in rows]
        if len(set(names)) != len(names) or PLAIN not in names:
            raise ValueError(f"{where}: row names must be unique and include {PLAIN!r}")
        for r in rows:
            if r.stage in ("screen", "final") and r.init_from is None:
                raise ValueError(f"{where}: {r.name} is a fine-tuning row ({r.stage}) but names no init_from")
            if r.init_from is not None and r.init_from not in names:
                raise ValueError(
                    f"{where}: {r.name}.init_from {r.init_from!r} is not a row{nearest(r.init_from, names)}"
                )
            if r.init_from is not None and not next(s for s in rows if s.name == r.init_from).keep:
                raise ValueError(f"{where}: {r.name} starts from {r.init_from}, which must have keep: true")
        ladders.append(
            Ladder(
                name=str(lad["name"]),
                title=str(lad.get("title", lad["name"])),
                schedule=_settings(f"{where}.schedule", lad.get("schedule")),
                records=str(lad["records"]),
                baselines={str(k): str(v) for k, v in (lad.get("baselines") or {}).items()},
                rows=rows,
            )
        )
    if not ladders:
        raise ValueError("ladders must list at least one ladder")
    return Study(
        command=str(data["command"]), docs=str(data["docs"]), records=str(data["records"]), ladders=tuple(ladders)
    )


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class StudyJob:
    ladder: Ladder
    row: StudyRow
    job: Job

    @classmethod
    def of(cls, ladder: Ladder, row: StudyRow, seed: int) -> StudyJob:
        """``row`` of ``ladder`` on ``seed``: the ladder's schedule, then the row's overrides."""
        return cls(ladder, row, Job(row.name, None, seed, row.config, {**ladder.schedule, **row.overrides}))

    @property
    def key(self) -> str:
        return f"{self.ladder.name}/{self.job.key}"

    def source(self) -> StudyJob | None:
        """The run this one starts from (its ``init_from`` row, same seed); None for a row trained from scratch."""
        if self.row.init_from is None:
            return None
        return StudyJob.of(
            self.ladder, next(r for r in self.ladder.rows if r.name == self.row.init_from), self.job.seed
        )


def study_jobs(study: Study, only: Sequence[str] = (), ladders: Sequence[str] = ()) -> list[StudyJob]:
    out = []
    for lad in study.ladders:
        if ladders and lad.name not in ladders:
            continue
        seeds = sorted({s for r in lad.rows for s in r.seeds})
        for s in seeds:
            for r in lad.rows:
                if s in r.seeds and (not only or r.name in only):
                    out.append(StudyJob.of(lad, r, s))
    return out


def record_file(study: Study, sj: StudyJob) -> Path:
    return Path(study.records) / sj.ladder.name / f"{sj.job.key}.json"


def run_dir(runs_dir: Path, sj: StudyJob) -> Path:
    return runs_dir / sj.ladder.name / sj.job.key


def has_checkpoint(folder: Path) -> bool:
    return latest_checkpoint(folder) is not None


def todo_jobs(study: Study, jobs: Sequence[StudyJob], runs_dir: Path) -> list[StudyJob]:
    """Jobs without a record, plus the sources (keep rows) whose checkpoints a pending job needs and are gone."""
    todo = [sj for sj in jobs if not record_file(study, sj).is_file()]
    sources = []
    for sj in todo:
        src = sj.source()
        if src and not has_checkpoint(run_dir(runs_dir, src)) and src.key not in {t.key for t in todo + sources}:
            sources.append(src)
    return sources + todo


def run_study(study: Study, todo: list[StudyJob], runs_dir: Path, jobs: int, threads: int) -> list[str]:
    """Run ``todo`` ``jobs`` at a time; a job starts once the run it starts from has its checkpoint."""
    runners = {}
    for sj in todo:
        folder = runs_dir / sj.ladder.name
        folder.mkdir(parents=True, exist_ok=True)
        runners.setdefault(sj.ladder.name, Runner(Path(study.records) / sj.ladder.name, folder, threads))
    waiting, running, failed = list(todo), {}, []
    pool = ThreadPoolExecutor(max_workers=jobs)
    done = 0

    def ready(sj: StudyJob) -> bool | None:  # None: its source failed
        source = sj.source()
        if source is None:
            return True
        src = source.key
        if src in failed:
            return None
        return src not in {t.key for t in waiting} | {t.key for t in running.values()}

    try:
        while waiting or running:
            for sj in list(waiting):
                if len(running) >= jobs:
                    break
                state = ready(sj)
                if state is None:
                    waiting.remove(sj)
                    failed.append(sj.key)
                    print(f"{sj.key} not run: the run it starts from failed", flush=True)
                elif state:
                    waiting.remove(sj)
                    extra = {}
                    if source := sj.source():
                        extra["model.init"] = str(run_dir(runs_dir, source))
                    running[pool.submit(runners[sj.ladder.name].run, sj.job, keep=sj.row.keep, extra=extra)] = sj
            if not running:
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                sj, done = running.pop(fut), done + 1
                try:
                    rec = fut.result()
                except Exception as e:  # the sweep goes on; the pair stays pending
                    failed.append(sj.key)
                    print(f"[{done}/{len(todo)}] {sj.key} FAILED ({e}); log {runs_dir}/{sj.key}.log", flush=True)
                    continue
                acc = "  ".join(f"{float(d):g}: {v:.2f}" for d, v in rec["top1"].items())
                print(f"[{done}/{len(todo)}] {sj.key}: {rec['train_seconds']:.0f} s training, top-1 {acc}", flush=True)
    except KeyboardInterrupt:
        for fut in running:
            fut.cancel()
        for r in runners.values():
            r.kill_all()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    return failed


# ---------------------------------------------------------------------------------------------- report


def _load(folder: Path, name: str, seeds: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
    out = {}
    for p in sorted(folder.glob(f"{name}_s*.json")):
        rec = json.loads(p.read_text())
        if rec.get("name") == name and (seeds is None or rec["seed"] in seeds):
            out[rec["seed"]] = rec
    return out


def summarise(recs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    seeds = sorted(recs)
    depths = sorted({d for r in recs.values() for d in r["top1"]}, key=float)
    top1 = {d: [recs[s]["top1"].get(d) for s in seeds] for d in depths}
    stats = {d: mean_std(v) for d, v in top1.items()}
    return {
        "seeds": seeds,
        "top1": top1,
        "mean": {d: m for d, (m, _) in stats.items()},
        "std": {d: s for d, (_, s) in stats.items()},
        "train_seconds": [recs[s].get("train_seconds") for s in seeds],
    }


def paired(a: Mapping[str, Any], b: Mapping[str, Any], depth: str, b_depth: str | None = None) -> dict[str, Any]:
    """a minus b seed by seed, on the seeds both have: mean, std, n, and how many seeds a is >= b."""
    bd = b_depth or depth
    seeds = [s for s in a["seeds"] if s in b["seeds"]]
    diffs = [
        a["top1"][depth][a["seeds"].index(s)] - b["top1"][bd][b["seeds"].index(s)]
        for s in seeds
        if depth in a["top1"] and bd in b["top1"]
    ]
    m, sd = mean_std(diffs)
    return {"mean": m, "std": sd, "n": len(diffs), "wins": sum(d >= 0 for d in diffs)}


def aggregate(study: Study) -> dict[str, Any]:
    out: dict[str, Any] = {"command": study.command, "ladders": {}}
    for lad in study.ladders:
        here = Path(study.records) / lad.name
        rows = {}
        for r in lad.rows:
            recs = _load(here, r.name, r.seeds)
            if recs:
                rows[r.name] = {"stage": r.stage, "config": r.config, "overrides": r.overrides, "note": r.note,
                                "init_from": r.init_from, **summarise(recs)}  # fmt: skip
        base = {}
        for label, name in lad.baselines.items():
            recs = _load(Path(lad.records), name, None)
            if recs:
                base[label] = {"row": name, "records": lad.records, **summarise(recs)}
        out["ladders"][lad.name] = {"title": lad.title, "schedule": lad.schedule, "rows": rows, "baselines": base}
    return out


def _seconds(summary: Mapping[str, Any]) -> float | None:
    xs = [x for x in summary["train_seconds"] if x is not None]
    return statistics.fmean(xs) if xs else None


def targets(lad: Mapping[str, Any], name: str) -> list[tuple[str, bool | None, str]]:
    """The issue's three targets for one fine-tuning row: (goal, met, detail)."""
    row, rows, base = lad["rows"][name], lad["rows"], lad["baselines"]
    out = []
    alone = base.get(DEPTH_TARGET_ROW)
    if alone:
        diffs = {d: paired(row, alone, d) for d in row["mean"]}
        means = {d: row["mean"][d] - alone["mean"][d] for d in row["mean"] if d in alone["mean"]}
        met = all(v >= 0 for v in means.values())
        detail = ", ".join(
            f"s={float(d):g}: {_pm(means[d], None, True).split(' ')[0]} (paired {_pm(p['mean'], p['std'], True)}, "
            f"{p['wins']}/{p['n']} seeds)"
            for d, p in diffs.items()
            if d in means
        )
        out.append(("Teammate A >= the nets trained alone at every depth (mean top-1)", met, detail))
    if PLAIN in rows:
        p = paired(row, rows[PLAIN], "1.0")
        out.append(
            (
                "Teammate A at s = 1 >= the plain net it started from (paired by seed)",
                p["mean"] is not None and p["mean"] >= 0,
                f"{_pm(p['mean'], p['std'], True)} ({p['wins']}/{p['n']} seeds >= 0)",
            )
        )
    timing = rows.get("independent_timed")
    if timing and _seconds(timing):
        ratio = _seconds(row) / _seconds(timing)
        out.append(
            (
                "fine-tuning costs <= half the training time of the four nets trained alone",
                ratio <= 0.5,
                f"{_seconds(row):.0f} s vs {_seconds(timing):.0f} s: {ratio:.2f}x",
            )
        )
    return out


def render(study: Study, agg: Mapping[str, Any], generated_by: str) -> str:
    lines = [
        "# Fine-tuning a trained net into a cost-adaptive one, against training from scratch",
        "",
        f"Generated by `{generated_by}` from `{study.records}/*/*.json` (made by `{study.command}`); "
        f"the numbers are in `{study.docs}/finetune.json`. Do not edit by hand.",
        "",
        "Each fine-tuning run starts from the plain net of the same seed (one net trained at full depth on the",
        "ladder's schedule, as the ladder's `full_only` rung) and trains one Teammate at every depth, guided by",
        "that plain net as a frozen Leader; the guide is [docs/guide/finetune.md](../../guide/finetune.md).",
        "Top-1 is the validation accuracy (%) of Teammate A at each scaling factor s; mean ± std over seeds.",
        "Paired differences are taken seed by seed on the seeds both rows have.",
        "Train times are measured in this sweep, all rows on the same machine with the same threads (two runs at a",
        "time on 2 cores, one thread each); the ladders' own baselines (`independent`, `ctf`) were timed elsewhere",
        "and are not compared for cost.",
        "",
    ]
    for lad_spec in study.ladders:
        lad = agg["ladders"][lad_spec.name]
        rows, base = lad["rows"], lad["baselines"]
        sched = ", ".join(f"{k}={v}" for k, v in lad["schedule"].items())
        lines += [f"## {lad['title']}", "", f"Schedule of the plain nets and baselines: `{sched}`.", ""]
        finals = [n for n, r in rows.items() if r["stage"] == "final"]
        lines += ["### Targets", ""]
        if not finals:
            lines += ["No fine-tuning row has results yet.", ""]
        for name in finals:
            lines.append(f"**{name}** ({rows[name]['note'] or rows[name]['overrides']}, seeds {rows[name]['seeds']}):")
            lines.append("")
            for goal, met, detail in targets(lad, name):
                lines.append(f"- {'met' if met else 'NOT met'}: {goal}: {detail}")
            lines.append("")
        tried = [f"`{n}` ({r['note'].removeprefix('screen: ')}, {len(r['seeds'])} seeds)" for n, r in rows.items()
                 if r["stage"] == "screen"]  # fmt: skip
        if tried:
            lines += ["Also tried (the recipe screen, each row against the final rows below): " + "; ".join(tried), ""]
        all_rows = [(f"{label} (ladder: `{b['row']}`)", b) for label, b in base.items()]
        all_rows += [(f"{n} (this machine)" if r["stage"] == "timing" else n, r) for n, r in rows.items()]
        depths = sorted({d for _, r in all_rows for d in r["mean"]}, key=float)
        lines += ["### Accuracy per depth", ""]
        lines += _table(
            ["row", "seeds", *(f"s={float(d):g}" for d in depths)],
            [
                [label, str(len(r["seeds"])), *(_pm(r["mean"].get(d), r["std"].get(d)) for d in depths)]
                for label, r in all_rows
            ],
        )
        lines.append("")
        ft = [n for n, r in rows.items() if r["stage"] in ("final", "screen")]
        if ft:
            lines += ["### Paired differences (fine-tuned minus baseline, per depth)", ""]
            body = []
            for n in ft:
                for label, other, same_depth in (
                    ("trained alone", base.get("independent"), True),
                    ("plain, truncated", rows.get(PLAIN), True),
                    ("CTF from scratch", base.get("ctf"), True),
                    ("plain at s=1", rows.get(PLAIN), False),
                ):
                    if other is None:
                        continue
                    cells = []
                    for d in depths:
                        p = paired(rows[n], other, d, None if same_depth else "1.0")
                        cells.append(f"{_pm(p['mean'], p['std'], True)} ({p['wins']}/{p['n']})" if p["n"] else "—")
                    body.append([n, label, *cells])
            lines += _table(["row", "against", *(f"s={float(d):g}" for d in depths)], body)
            lines += ["", "(k/n): the seeds on which the fine-tuned net is at least as accurate.", ""]
        cost = agg.get("cost")
        if cost and cost["ladder"] == lad_spec.name:
            lines += cost_lines(cost, rows, cost["command"])
        lines += ["### Cost (train seconds, this sweep: two runs at a time)", ""]
        plain_s = _seconds(rows[PLAIN]) if PLAIN in rows else None
        timed = rows.get("independent_timed")
        alone_s = _seconds(timed) if timed else None
        cost = []
        for n, r in rows.items():
            s = _seconds(r)
            if s is None:
                continue
            total = s + plain_s if r.get("init_from") == PLAIN and plain_s else None
            cost.append(
                [
                    n,
                    str(len(r["seeds"])),
                    _pm(*mean_std(r["train_seconds"])),
                    f"{s / alone_s:.2f}x" if alone_s else "—",
                    f"{total:.0f}" if total else "—",
                    f"{total / alone_s:.2f}x" if total and alone_s else "—",
                ]
            )
        lines += _table(["row", "seeds", "train s", "÷ 4 nets alone", "plain + this (s)", "÷ 4 nets alone"], cost)
        lines += [""]
        notes = [f"- **{n}**: {r['note']}" for n, r in rows.items() if r["note"]]
        if notes:
            lines += ["### Rows", "", *notes, ""]
    return "\n".join(lines).rstrip() + "\n"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def measure_cost(study: Study, ladder: str, runs_dir: Path, repeats: int, threads: int, command: str) -> dict[str, Any]:
    """Train seconds of one epoch of the plain net, of the four nets alone and of the recipe (the first final row's
    settings), one run at a time, ``repeats`` rounds interleaved; the recipe starts from seed 0's plain run of the
    sweep. Written to ``<docs>/cost.json``."""
    lad = next((x for x in study.ladders if x.name == ladder), None)
    if lad is None:
        raise ValueError(f"--ladder: no ladder {ladder!r}{nearest(ladder, [x.name for x in study.ladders])}")
    final = next((r for r in lad.rows if r.stage == "final"), None)
    timing = next((r for r in lad.rows if r.stage == "timing"), None)
    if final is None or timing is None:
        raise ValueError(f"ladder {ladder}: the cost needs a final row and a timing row")
    source = run_dir(runs_dir, StudyJob.of(lad, final, 0).source())
    if not has_checkpoint(source):
        raise ValueError(f"{source} has no checkpoint: run the sweep first (its plain net of seed 0 is the source)")
    rows = {PLAIN: next(r for r in lad.rows if r.name == PLAIN), timing.name: timing, "recipe": final}
    work = runs_dir / "cost"
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work / "records", work, threads)
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(repeats):
        for name, row in rows.items():
            job = Job(f"cost_{name}", None, i, row.config, {**lad.schedule, **row.overrides, "train.epochs": 1})
            extra = {"model.init": str(source)} if row.init_from else {}
            rec = runner.run(job, extra=extra)
            seconds[name].append(rec["train_seconds"])
            print(f"[{i + 1}/{repeats}] {name}: {rec['train_seconds']:.1f} s for one epoch", flush=True)
    return {
        "command": command,
        "ladder": lad.name,
        "epochs_of_schedule": lad.schedule.get("train.epochs"),
        "threads": threads,
        "repeats": repeats,
        "cpu": _cpu(),
        "rows": {name: {"config": r.config, "overrides": r.overrides} for name, r in rows.items()},
        "seconds_per_epoch": seconds,
    }


def cost_lines(cost: Mapping[str, Any], rows: Mapping[str, Any], command: str) -> list[str]:
    """The page's cost section from cost.json: per-epoch seconds, then each final row's cost both ways."""
    sec = {name: mean_std(v) for name, v in cost["seconds_per_epoch"].items()}
    timing = next(n for n in cost["seconds_per_epoch"] if n not in (PLAIN, "recipe"))
    epochs = cost["epochs_of_schedule"]
    alone = sec[timing][0] * epochs
    plain = sec[PLAIN][0] * epochs
    lines = [
        "### Cost, timed one run at a time",
        "",
        f"`{command}` trained one epoch of each, one run at a time with {cost['threads']} thread(s), "
        f"{cost['repeats']} rounds interleaved, on {cost['cpu']}:",
        "",
    ]
    lines += _table(
        ["", "train s per epoch", f"x {epochs} epochs"],
        [
            ["the four nets trained alone", _pm(*sec[timing]), f"{alone:.0f}"],
            ["the plain net", _pm(*sec[PLAIN]), f"{plain:.0f}"],
            ["the recipe (fine-tuning)", _pm(*sec["recipe"]), "—"],
        ],
    )
    body = []
    for name, r in rows.items():
        if r["stage"] != "final":
            continue
        n = r["overrides"].get("train.epochs", epochs)
        ft = sec["recipe"][0] * n
        body.append(
            [name, str(n), f"{ft:.0f}", f"{ft / alone:.2f}x", f"{plain + ft:.0f}", f"{(plain + ft) / alone:.2f}x"]
        )
    lines += ["", "Each fine-tuning row's cost, its epochs times the recipe's seconds per epoch:", ""]
    lines += _table(
        ["row", "epochs", "fine-tuning s", "÷ 4 nets alone", "plain + fine-tuning s", "÷ 4 nets alone"], body
    )
    return [*lines, ""]


def report(study: Study, generated_by: str) -> None:
    """Write ``<docs>/finetune.json`` and ``<docs>/RESULTS.md`` (with the hand-written ``<docs>/notes.md`` inserted
    after the introduction, where it exists)."""
    agg = aggregate(study)
    cost_file = Path(study.docs) / "cost.json"
    if cost_file.is_file():
        agg["cost"] = json.loads(cost_file.read_text())
    write_json(Path(study.docs) / "finetune.json", agg)
    page = Path(study.docs) / "RESULTS.md"
    tmp = page.with_name(".RESULTS.md.tmp")
    text = render(study, agg, generated_by)
    notes = Path(study.docs) / "notes.md"
    if notes.is_file():
        first = text.index("\n## ")
        text = text[:first] + "\n" + notes.read_text().rstrip() + "\n" + text[first:]
    tmp.write_text(text)
    os.replace(tmp, page)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report", "cost"):
        p = sub.add_parser(name)
        p.add_argument("--spec", required=True, help="study spec YAML (experiments/configs/finetune.yaml)")
    cost = sub.choices["cost"]
    cost.add_argument("--ladder", required=True, help="the ladder whose rows are timed")
    cost.add_argument("--repeats", type=int, default=3, help="rounds of the three runs")
    cost.add_argument("--threads", type=int, default=1, help="torch threads per run")
    cost.add_argument("--runs-dir", default="runs/finetune", help="the sweep's training output (its plain nets)")
    run = sub.choices["run"]
    run.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    run.add_argument("--threads", type=int, default=0, help="torch threads per run (default cores // jobs)")
    run.add_argument("--only", default="", help="comma-separated row names")
    run.add_argument("--ladder", default="", help="comma-separated ladder names")
    run.add_argument("--runs-dir", default="runs/finetune", help="training output and logs")
    run.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    args = parser.parse_args(argv)
    try:
        study = parse_study(yaml.safe_load(Path(args.spec).read_text()))
        generated_by = f"python experiments/finetune_study.py report --spec {args.spec}"
        if args.command == "cost":
            if args.repeats < 1:
                raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
            command = (
                f"python experiments/finetune_study.py cost --spec {args.spec} --ladder {args.ladder} "
                f"--repeats {args.repeats} --threads {args.threads}"
            )
            cost = measure_cost(study, args.ladder, Path(args.runs_dir), args.repeats, args.threads, command)
            write_json(Path(study.docs) / "cost.json", cost)
            report(study, generated_by)
            print(f"wrote {study.docs}/cost.json and {study.docs}/RESULTS.md")
            return 0
        if args.command == "run":
            only = [n for n in args.only.split(",") if n]
            jobs = study_jobs(study, only, [n for n in args.ladder.split(",") if n])
            runs_dir = Path(args.runs_dir)
            todo = todo_jobs(study, jobs, runs_dir)
            threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
            print(f"{len(todo)} run(s) to do, {args.jobs} at a time, {threads} thread(s) each; logs in {runs_dir}/")
            if args.dry_run:
                for sj in todo:
                    print(f"  {sj.key}")
                return 0
            preflight([sj.job for sj in todo])
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                failed = run_study(study, todo, runs_dir, args.jobs, threads)
            except KeyboardInterrupt:
                print("interrupted; finished runs are kept, rerun the same command to continue")
                return 130
            report(study, generated_by)
            print(f"wrote {study.docs}/RESULTS.md")
            if failed:
                print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
            return 1 if failed else 0
        report(study, generated_by)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {study.docs}/RESULTS.md and {study.docs}/finetune.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
