"""The ablation sweep: every ladder rung and recipe variant x seeds, resumable, and the report made from it.

    python experiments/ablation.py run --spec experiments/configs/ladder.yaml --jobs 2 [--only ctf,sfsl] [--set train.epochs=1]
    python experiments/ablation.py report --spec experiments/configs/ladder.yaml
    python experiments/ablation.py adopt --spec experiments/configs/ladder.yaml --from ctf_x --to ctf

`run` trains each (row, seed) pair that has no per-run JSON yet (`<records>/<name>_s<seed>.json`, written atomically
after the run succeeds, so a killed or crashed run is simply retried), keeps only that JSON (the run's checkpoints are
deleted) and ends with `report`. `report` turns the per-run JSON into the page folder's `ladder.json`, `ladder.png`
and `RESULTS.md`. The spec (plain YAML, read by ladder_spec.py) is data: the page folder (`docs`), the records folder
(`records`), the schedule applied to every run, the seeds, the rung configs and the recipe variants; see
experiments/configs/ladder.yaml.
`adopt` moves the records of one row to another when a default changed and the two now train the same experiment
(a variant that became the default becomes the rung; the rung's old runs become a variant pinning the old value):
each record's own command, resolved with the code as it is, must equal the target row's, or nothing is moved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation_report import aggregate, check_targets, plot_ladder, render_markdown
from ladder_spec import Row, Spec, load_spec, nearest, parse_sets, parse_spec

__all__ = ["Row", "Spec", "load_spec", "parse_sets", "parse_spec"]  # the spec, read by ladder_spec

REPORTED_NETS = ("teammate_a", "independent")  # the first one a run has is the one reported
TAIL_LINES = 40


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
            raise ValueError(f"--only: no rung or variant {name!r}{nearest(name, names)}")
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


RUN_FLAGS = ("train.seed", "train.run_name", "train.out_dir", "tracking.backend", "train.progress", "train.threads")


def resolved(config: str, overrides: Sequence[str]) -> dict[str, Any]:
    """What a command trains under the code as it is now: its resolved config less each run's own flags
    (seed, names, folders, threads; the seed is compared separately)."""
    from dist_coop.config import load_config  # the one import of the package: the sweep itself only starts runs

    def flag(o: str) -> str:
        return o.split("=", 1)[0].removeprefix("--")

    out = load_config(config, [o for o in overrides if flag(o) not in RUN_FLAGS]).to_dict()
    for key in RUN_FLAGS:
        section, name = key.split(".")
        out[section].pop(name, None)
    return out


def adopt(spec: Spec, results_dir: str | Path, source: str, target: str) -> list[str]:
    """Move the records ``<source>_s<seed>.json`` to row ``target`` (its name, rung, config and settings; the
    record keeps its numbers and notes ``adopted_from``). Every record must train, under the code as it is, what
    ``target``'s command for its seed trains, and ``target`` must have no record for that seed: else nothing moves.
    ``source == target`` rewrites a row's records with its settings now (a row that pins a value its runs were made
    with as the default, before the default changes)."""
    names = [r.name for r in spec.rows]
    if target not in names:
        raise ValueError(f"--to: no rung or variant {target!r}{nearest(target, names)}")
    row = spec.row(target)
    paths = sorted(Path(results_dir).glob(f"{source}_s*.json"))
    paths = [p for p in paths if p.stem.removeprefix(f"{source}_s").isdigit()]
    if not paths:
        raise ValueError(f"--from: no records {source}_s<seed>.json in {results_dir}")
    moves = []
    for path in paths:
        rec = json.loads(path.read_text())
        seed = rec["seed"]
        if seed not in row.seeds:
            raise ValueError(f"{path.name}: seed {seed} is not one of {target}'s seeds {list(row.seeds)}")
        job = Job(row.name, row.rung, seed, row.config, {**spec.schedule, **row.overrides})
        want = resolved(job.config, [f"--{k}={_cli_value(v)}" for k, v in job.settings.items()])
        have = resolved(rec["config"], rec["overrides"])
        if want != have:
            diff = [f"{s}.{k}: {have[s].get(k)!r} (record) vs {want[s].get(k)!r} ({target})"
                    for s in want for k in sorted(set(want[s]) | set(have.get(s, {}))) if want[s].get(k) != have.get(s, {}).get(k)]  # fmt: skip
            raise ValueError(f"{path.name} trained another experiment than {target}: {'; '.join(diff)}")
        dest = record_path(results_dir, job)
        if dest.exists() and dest != path:
            raise ValueError(f"{dest.name} exists: adopt {target}'s records into another row first")
        adopted = [*rec.get("adopted_from", []), rec["name"]] if source != target else rec.get("adopted_from", [])
        moves.append((path, dest, {**rec, "name": row.name, "rung": row.rung, "config": job.config,
                                   "settings": job.settings, "adopted_from": adopted}))  # fmt: skip
    for path, dest, rec in moves:
        write_json(dest, rec)
        if dest != path:
            path.unlink()
    return [dest.name for _, dest, _ in moves]


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
    # train.eval_train: the same nets on their training samples, without augmentation (the fit gap)
    fit = {k.removeprefix("train_eval/acc1/"): float(v) for k, v in metrics.items() if k.startswith("train_eval/acc1/")}
    record = {
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
    if fit:
        record["train_top1"] = {d: fit[f"{net}@{d}"] for d in depths}
        record["all_train_top1"] = fit
    return record


def write_json(path: str | Path, data: Any) -> None:
    """Write atomically: a reader (or a resumed sweep) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]


# ---------------------------------------------------------------------------------------------- commands


def report(spec: Spec, results_dir: str | Path, docs_dir: str | Path, generated_by: str) -> dict[str, Any]:
    """Write ladder.json, ladder.png and RESULTS.md into the page folder ``docs_dir``; return the ladder."""
    docs = Path(docs_dir)
    ladder = aggregate(spec, load_records(results_dir))
    write_json(docs / "ladder.json", ladder)
    plot_ladder(ladder, docs / "ladder.png")
    old = stale(build_jobs(spec), results_dir)
    warnings = [f"{len(old)} run(s) were made with another config or schedule than the spec: {', '.join(old)}"] * bool(
        old
    )
    others = []
    for folder in spec.other_ladders:
        path = Path(folder) / "ladder.json"
        if Path(folder).resolve() == docs.resolve():
            continue
        if not path.is_file():
            warnings.append(f"other_ladders: {path} does not exist (run that ladder's sweep)")
            continue
        link = Path(os.path.relpath(Path(folder) / "RESULTS.md", docs)).as_posix()
        others.append((link, json.loads(path.read_text())))
    extra = {n: (docs / n).read_text() if (docs / n).is_file() else None for n in ("notes.md", "recipes.md")}
    text = render_markdown(
        ladder,
        check_targets(ladder),
        generated_by=generated_by,
        source=f"{Path(results_dir).as_posix()}/*.json",
        notes=extra["notes.md"],
        recipes=extra["recipes.md"],
        warnings=warnings,
        notes_path=(docs / "notes.md").as_posix(),
        others=others,
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

    def run(self, job: Job, keep: bool = False, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Train ``job`` from scratch; on success write its JSON and delete its checkpoints (unless ``keep``).
        ``extra`` settings are passed after the job's own (run-specific paths such as model.init), and the record
        lists them among its overrides. Raises on failure."""
        run_dir, log = self.work_dir / job.key, self.work_dir / f"{job.key}.log"
        shutil.rmtree(run_dir, ignore_errors=True)  # a killed earlier attempt: start over
        overrides = job.overrides(self.work_dir, self.threads)
        overrides += [f"--{k}={_cli_value(v)}" for k, v in (extra or {}).items()]
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
        if not keep:
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
    for name in ("run", "report", "adopt"):
        p = sub.add_parser(name)
        p.add_argument("--spec", required=True, help="sweep spec YAML (experiments/configs/ladder.yaml)")
        p.add_argument("--results", "--out", default=None, help="per-run JSON folder (default: the spec's records)")
        p.add_argument(
            "--docs", default=None, help="page folder: RESULTS.md, ladder.{json,png} (default: the spec's docs)"
        )
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a schedule entry")
    run = sub.choices["run"]
    run.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    run.add_argument("--threads", type=int, default=0, help="torch threads per run (default cores // jobs)")
    run.add_argument("--only", default="", help="comma-separated rung / variant names")
    run.add_argument("--runs-dir", default="runs/ladder", help="training output and logs (checkpoints are deleted)")
    run.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    sub.choices["adopt"].add_argument("--from", dest="source", required=True, help="the records' row name")
    sub.choices["adopt"].add_argument("--to", dest="target", required=True, help="the rung or variant they become")
    args = parser.parse_args(argv)
    try:
        if args.command == "run" and args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        spec = load_spec(args.spec, parse_sets(args.set))
        for flag, key in (("results", "records"), ("docs", "docs")):
            if getattr(args, flag) is None:
                if not getattr(spec, key):
                    raise ValueError(f"the spec names no {key} folder: give --{flag}")
                setattr(args, flag, getattr(spec, key))
        sets = "".join(f" --set {s}" for s in args.set)
        dirs = f" --results {args.results}" * (args.results != spec.records)
        dirs += f" --docs {args.docs}" * (args.docs != spec.docs)
        generated_by = f"python experiments/ablation.py report --spec {args.spec}{sets}{dirs}"
        if args.command == "run":
            return cmd_run(args, spec, generated_by)
        if args.command == "adopt":
            moved = adopt(spec, args.results, args.source, args.target)
            print(f"{args.source} -> {args.target}: {', '.join(moved)}")
        report(spec, args.results, args.docs, generated_by)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.docs}/RESULTS.md, {args.docs}/ladder.json, {args.docs}/ladder.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
