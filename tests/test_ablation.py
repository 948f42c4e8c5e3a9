"""The ablation sweep (experiments/ablation.py): spec, run list, per-run JSON, aggregation, targets, report."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dist_coop.config import parse_overrides
from tests.helpers import load_experiment

ROOT = Path(__file__).resolve().parents[1]


ab = load_experiment("ablation")
rp = sys.modules["ablation_report"]
DEPTHS = ("0.25", "0.5", "0.75", "1.0")


def _spec_data(**changes):
    data = {
        "command": "python experiments/ablation.py run --spec s.yaml",
        "schedule": {"train.epochs": 6, "data.train_subset": 8000},
        "seeds": [0, 1, 2],
        "rungs": {"ctf": "experiments/configs/6_full_ctf.yaml", "independent": "experiments/configs/1_independent.yaml"},
        "variants": [
            {"name": "ctf_T4", "config": "experiments/configs/6_full_ctf.yaml", "overrides": {"coop.temperature": 4.0},
             "seeds": [0], "note": "T=4"},
        ],
    }  # fmt: skip
    data.update(changes)
    return data


def _results(net_accs, train_seconds=12.5, fit=None):
    """A results.json dict: ``net_accs[net] = [top-1 at each of DEPTHS]``; ``fit[net]`` the same on the training
    samples (``train.eval_train``)."""
    metrics, costs = {}, {}
    for net, accs in net_accs.items():
        for d, acc in zip(DEPTHS, accs):
            metrics[f"val/acc1/{net}@{d}"] = acc
            metrics[f"val/loss/{net}@{d}"] = 1.0
            costs[f"cost/gflops/{net}@{d}"] = 0.01 * float(d)
    for net, accs in (fit or {}).items():
        metrics.update({f"train_eval/acc1/{net}@{d}": acc for d, acc in zip(DEPTHS, accs)})
        metrics.update({f"train_eval/loss/{net}@{d}": 0.5 for d in DEPTHS})
    out = {"step": 10, "metrics": metrics, "costs": costs, "placement": "colocated"}
    if train_seconds is not None:
        out["train_seconds"] = train_seconds
    return out


def _records(spec, accs_by_job):
    """Per-run JSON records for ``accs_by_job[(name, seed)] = [top-1 per depth]``."""
    jobs = {(j.name, j.seed): j for j in ab.build_jobs(spec)}
    out = []
    for (name, seed), accs in accs_by_job.items():
        net = "independent" if name == "independent" else "teammate_a"
        out.append(ab.run_record(jobs[name, seed], _results({net: accs}), ["--x.y=1"], 60.0))
    return out


# ------------------------------------------------------------------ spec


def test_spec_rows_in_ladder_order_and_variant_seeds():
    spec = ab.parse_spec(_spec_data())
    assert [r.name for r in spec.rows] == ["independent", "ctf", "ctf_T4"]
    assert spec.row("ctf").seeds == (0, 1, 2) and spec.row("ctf").rung == "ctf"
    assert spec.row("ctf_T4").seeds == (0,) and spec.row("ctf_T4").rung is None
    data = _spec_data()
    del data["variants"][0]["seeds"]
    assert ab.parse_spec(data).row("ctf_T4").seeds == (0, 1, 2)


def test_set_overrides_schedule():
    spec = ab.parse_spec(_spec_data(), ab.parse_sets(["train.epochs=1", "train.max_steps=2"]))
    assert spec.schedule == {"train.epochs": 1, "data.train_subset": 8000, "train.max_steps": 2}


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"seed": [0]}, "spec: unknown key 'seed'; did you mean 'seeds'"),
        ({"rungs": {"ctff": "a.yaml"}}, "unknown rung 'ctff'; did you mean 'ctf'"),
        ({"rungs": {}}, "rungs must be a non-empty mapping"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"seeds": [0, 0]}, "seeds has a seed twice"),
        ({"command": ""}, "command must be"),
        ({"schedule": {"epochs": 3}}, "schedule: keys look like section.key"),
        ({"rungs": {"ctf": 3}}, "rungs.ctf must be the path of a YAML config"),
        ({"variants": [{"name": "v", "config": "a.yaml", "seed": [0]}]}, r"variants\[0\]: unknown key 'seed'"),
        ({"variants": [{"name": "v"}]}, "variants.v.config is missing"),
        ({"variants": [{"name": "ctf", "config": "a.yaml"}]}, "variants.ctf: the name is already used"),
        ({"variants": [{"name": "a b", "config": "a.yaml"}]}, r"variants\[0\].name must be"),
        ({"variants": [{"name": "v", "config": "a.yaml", "overrides": {"coop.t": {"x": 1}}}]}, "scalar or a list"),
        ({"other_ladders": "docs/1k"}, "other_ladders must be a list of docs folders"),
    ],
)
def test_spec_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        ab.parse_spec(_spec_data(**changes))


def test_load_spec_checks_config_files(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(_spec_data(rungs={"ctf": "configs/nope.yaml"}, variants=[])))
    with pytest.raises(ValueError, match="ctf: config file not found: configs/nope.yaml"):
        ab.load_spec(path)
    with pytest.raises(ValueError, match="--set takes section.key=value"):
        ab.parse_sets(["train.epochs"])


def test_repository_spec_is_valid(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = ab.load_spec("experiments/configs/ladder.yaml")
    assert [r.name for r in spec.rows if r.rung] == list(sys.modules["ladder_spec"].RUNGS)


# ------------------------------------------------------------------ run list


def test_jobs_are_seed_major_and_overrides_apply_after_schedule():
    spec = ab.parse_spec(_spec_data())
    jobs = ab.build_jobs(spec)
    assert [j.key for j in jobs] == [
        "independent_s0", "ctf_s0", "ctf_T4_s0", "independent_s1", "ctf_s1", "independent_s2", "ctf_s2",
    ]  # fmt: skip
    args = jobs[2].overrides("runs/ladder", threads=1)
    assert args[-1] == "--coop.temperature=4.0" and "--train.seed=0" in args and "--train.threads=1" in args
    parsed = parse_overrides(args)  # the training CLI reads back what was meant
    assert parsed["train"]["epochs"] == 6 and parsed["coop"]["temperature"] == 4.0
    assert parsed["train"]["progress"] is False and parsed["tracking"]["backend"] == "none"
    assert [j.key for j in ab.build_jobs(spec, only=["ctf"])] == ["ctf_s0", "ctf_s1", "ctf_s2"]
    with pytest.raises(ValueError, match="--only: no rung or variant 'cft'; did you mean 'ctf'"):
        ab.build_jobs(spec, only=["cft"])


def test_a_pair_with_json_is_skipped_and_stale_json_is_found(tmp_path):
    spec = ab.parse_spec(_spec_data())
    jobs = ab.build_jobs(spec)
    ab.write_json(ab.record_path(tmp_path, jobs[1]), ab.run_record(jobs[1], _results({"teammate_a": [1] * 4}), [], 1))
    todo = ab.pending(jobs, tmp_path)
    assert len(todo) == len(jobs) - 1 and jobs[1] not in todo
    assert ab.stale(jobs, tmp_path) == []
    changed = ab.build_jobs(ab.parse_spec(_spec_data(), {"train.epochs": 1}))
    assert ab.stale(changed, tmp_path) == ["ctf_s0"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


# ------------------------------------------------------------------ per-run JSON


def test_run_record_reports_teammate_a():
    spec = ab.parse_spec(_spec_data())
    job = ab.build_jobs(spec)[1]
    res = _results({"leader": [1, 2, 3, 80], "teammate_a": [70, 72, 73, 75], "teammate_b": [69, 71, 72, 74]})
    rec = ab.run_record(job, res, ["--train.seed=0"], 61.23)
    assert rec["name"] == "ctf" and rec["rung"] == "ctf" and rec["seed"] == 0 and rec["net"] == "teammate_a"
    assert rec["top1"] == {"0.25": 70, "0.5": 72, "0.75": 73, "1.0": 75}
    assert list(rec["top1"]) == list(DEPTHS)
    assert rec["all_top1"]["leader@1.0"] == 80 and rec["all_top1"]["teammate_b@0.25"] == 69
    assert len(rec["all_top1"]) == 12
    assert rec["gflops"]["0.5"] == pytest.approx(0.005)
    assert rec["train_seconds"] == 12.5 and rec["wall_seconds"] == 61.2 and rec["step"] == 10
    assert rec["overrides"] == ["--train.seed=0"] and rec["config"] == "experiments/configs/6_full_ctf.yaml"


def test_run_record_keeps_the_training_set_accuracy_and_the_report_its_fit_table():
    spec = ab.parse_spec(_spec_data())
    jobs = {j.key: j for j in ab.build_jobs(spec)}
    fit = {"teammate_a": [80, 90, 91, 92], "leader": [1, 2, 3, 95]}
    rec = ab.run_record(jobs["ctf_s0"], _results({"teammate_a": [70, 72, 73, 75]}, fit=fit), [], 1.0)
    assert rec["train_top1"] == {"0.25": 80, "0.5": 90, "0.75": 91, "1.0": 92}
    assert rec["all_train_top1"]["leader@1.0"] == 95 and len(rec["all_train_top1"]) == 8
    assert "train_top1" not in ab.run_record(jobs["ctf_s1"], _results({"teammate_a": [70] * 4}), [], 1.0)
    # two seeds with the training-set accuracy: train 80 / 84 at s = 0.25 (mean 82, std sqrt(8)), val 70 / 71,
    # so the gaps are 10 and 13 (mean 11.5, std sqrt(4.5)); at s = 0.5 train 90 / 84, gaps 18 / 12 (15 ± sqrt(18));
    # ctf_T4 has none and is not in the fit table
    recs = [
        rec,
        ab.run_record(jobs["ctf_s1"], _results({"teammate_a": [71, 72, 73, 75]}, fit={"teammate_a": [84] * 4}), [], 1),
        ab.run_record(jobs["ctf_T4_s0"], _results({"teammate_a": [60] * 4}), [], 1.0),
    ]
    ladder = rp.aggregate(spec, recs)
    assert ladder["rungs"]["ctf"]["train_top1"]["0.25"] == [80, 84]
    (train, gap) = rp.fit_summary(ladder["rungs"]["ctf"], "0.25")
    assert train == pytest.approx((82.0, math.sqrt(8))) and gap == pytest.approx((11.5, math.sqrt(4.5)))
    assert rp.fit_summary(ladder["variants"]["ctf_T4"], "0.25") == ((None, None), (None, None))
    one = rp.on_seeds(ladder["rungs"]["ctf"], [1])
    assert one["train_top1"]["0.5"] == [84] and rp.fit_summary(one, "0.5")[1] == (12.0, None)
    md = rp.render_markdown(ladder, rp.check_targets(ladder), generated_by="GEN")
    assert "## How well each depth fits" in md
    assert "| ctf | 2 | 82.00 ± 2.83 | 87.00 ± 4.24 |" in md and "| +11.50 ± 2.12 | +15.00 ± 4.24 |" in md
    assert "| ctf_T4 | 1 |" not in md.split("## How well each depth fits")[1]


def test_run_record_independent_and_missing_fields():
    job = ab.build_jobs(ab.parse_spec(_spec_data()))[0]
    rec = ab.run_record(job, _results({"independent": [60, 65, 70, 75]}, train_seconds=None), [], 1.0)
    assert rec["net"] == "independent" and rec["top1"]["0.25"] == 60 and rec["train_seconds"] is None
    with pytest.raises(ValueError, match="none of the nets"):
        ab.run_record(job, _results({"leader": [1, 2, 3, 4]}), [], 1.0)


# ------------------------------------------------------------------ aggregation, targets


def _ladder(ctf_accs, ind_accs, full_accs=None):
    data = _spec_data()
    if full_accs is not None:
        data["rungs"]["full_only"] = "experiments/configs/2_full_only.yaml"
    spec = ab.parse_spec(data)
    accs = {("ctf", s): a for s, a in enumerate(ctf_accs)}
    accs.update({("independent", s): a for s, a in enumerate(ind_accs)})
    accs.update({("full_only", s): a for s, a in enumerate(full_accs or [])})
    return spec, rp.aggregate(spec, _records(spec, accs))


def test_aggregate_schema_mean_and_sample_std():
    spec, ladder = _ladder([[70, 72, 73, 74], [72, 74, 75, 76], [74, 76, 77, 78]], [[60, 65, 70, 75]])
    assert set(ladder) >= {"command", "schedule", "rungs"} and ladder["command"] == spec.command
    assert ladder["schedule"] == {"train.epochs": 6, "data.train_subset": 8000}
    ctf = ladder["rungs"]["ctf"]
    assert ctf["seeds"] == [0, 1, 2] and ctf["top1"]["0.25"] == [70, 72, 74] and ctf["train_seconds"] == [12.5] * 3
    assert ctf["mean"]["0.25"] == pytest.approx(72.0) and ctf["std"]["0.25"] == pytest.approx(2.0)  # by hand
    assert ladder["rungs"]["independent"]["std"]["1.0"] is None  # one seed
    assert list(ladder["rungs"]) == ["independent", "ctf"] and ladder["variants"] == {}
    # a seed the spec does not name and a row it does not name are ignored
    records = _records(spec, {("ctf", 0): [1, 2, 3, 4]})
    records += [{**records[0], "seed": 7}, {**records[0], "name": "old_variant"}]
    assert rp.aggregate(spec, records)["rungs"]["ctf"]["seeds"] == [0]
    json.dumps(ladder)  # serialisable


def test_difference_standard_error_by_hand():
    a = {"mean": {"1.0": 75.0}, "std": {"1.0": 2.0}, "top1": {"1.0": [73, 75, 77]}}
    b = {"mean": {"1.0": 70.0}, "std": {"1.0": 1.0}, "top1": {"1.0": [69, 70, 71, 70]}}
    diff, se = rp.difference(a, b, "1.0")
    assert diff == 5.0 and se == pytest.approx(math.sqrt(4 / 3 + 1 / 4))
    assert rp.difference(a, {"mean": {"1.0": 70.0}, "std": {"1.0": None}, "top1": {"1.0": [70]}}, "1.0") == (5.0, None)


def test_targets_met():
    _, ladder = _ladder([[72, 74, 76, 79.6]] * 2, [[60, 70, 75, 79]], full_accs=[[30, 60, 77, 80]])
    targets = rp.check_targets(ladder)
    assert [t.met for t in targets] == [True, True, True]
    assert "79.60 vs full-only 80.00" in targets[0].detail and "s=0.25: 72.00 vs 60.00 (+12.00)" in targets[1].detail


def test_targets_not_met_and_not_checked():
    _, ladder = _ladder([[76, 74, 75, 79]], [[60, 75, 70, 79.5]], full_accs=[[30, 60, 77, 80]])
    a, b, c = rp.check_targets(ladder)
    assert (a.met, b.met, c.met) == (False, False, False) and a.verdict == "NOT met"
    assert "s=0.5: 74.00 vs 75.00 (-1.00)" in b.detail
    _, ladder = _ladder([[70, 72, 73, 74]], [[60, 65, 70, 75]])
    a, b, c = rp.check_targets(ladder)
    assert a.met is None and a.verdict == "not checked" and "full_only" in a.detail and b.met is False


def _summary(seeds: list[int], per_seed: list[list[float]]) -> dict:
    depths = ["0.25", "0.5", "0.75", "1.0"]
    top1 = {d: [accs[i] for accs in per_seed] for i, d in enumerate(depths)}
    stats = {d: rp.mean_std(v) for d, v in top1.items()}
    return {"seeds": seeds, "top1": top1, "mean": {d: m for d, (m, _) in stats.items()},
            "std": {d: sd for d, (_, sd) in stats.items()}, "gflops": {}, "train_seconds": [], "wall_seconds": [],
            "note": "", "against": "ctf"}  # fmt: skip


def test_closest_configuration_by_hand():
    ind = _summary([0, 1, 2, 3], [[80, 85, 86, 86], [82, 87, 86, 88], [81, 86, 86, 87], [90, 90, 90, 90]])
    full = _summary([0, 1, 2, 3], [[20, 70, 80, 87], [20, 70, 80, 87], [20, 70, 80, 87], [20, 70, 80, 87]])
    ladder = {
        "command": "CMD",
        "schedule": {},
        "rungs": {
            "independent": ind,
            "full_only": full,
            "ctf": _summary([0, 1, 2], [[80, 84, 85, 85]] * 3),  # worst: 84 - 86 = -2 at s=0.5
        },
        "variants": {
            "near": _summary([0, 1, 2], [[81, 86, 86.5, 86.8]] * 3),  # -0 / 0 / +0.5 / -0.2: worst -0.2
            "two_seeds": _summary([0, 1], [[99, 99, 99, 99]] * 2),  # fewer than 3 seeds: not a candidate
            "far": _summary([0, 1, 3], [[80, 85, 85, 85]] * 3),  # compared with independent on seeds 0, 1, 3
            # a rerun of the baseline (the independent rung's config) is level with it: never the closest
            "independent_rerun": {**_summary([0, 1, 2], [[82, 87, 87, 88]] * 3), "config": "c/independent.yaml"},
        },
    }
    ind["config"] = "c/independent.yaml"
    name, diffs, targets = rp.closest(ladder)
    assert name == "near"
    # independent on seeds 0-2: 81 / 86 / 86 / 87 (seed 3 left out)
    assert diffs == pytest.approx({"0.25": 0.0, "0.5": 0.0, "0.75": 0.5, "1.0": -0.2})
    a, b, c = targets  # against full_only on seeds 0-2 (87) and independent on seeds 0-2
    assert (a.met, b.met, c.met) == (True, False, True) and "86.80 vs full-only 87.00" in a.detail
    ladder["variants"]["near"] = _summary([0, 1, 2], [[79, 80, 80, 80]] * 3)  # now ctf (-2) beats it (-6)
    assert rp.closest(ladder)[0] == "ctf"
    assert rp.closest({"rungs": {"ctf": ladder["rungs"]["ctf"]}}) is None  # nothing to compare with
    md = rp.render_markdown(ladder, rp.check_targets(ladder), generated_by="GEN")
    assert "**Closest configuration found:** `ctf`" in md and "s=0.5: -2.00" in md


# ------------------------------------------------------------------ markdown, report


def test_markdown_sections_not_met_and_inserted_files():
    _, ladder = _ladder([[76, 74, 75, 79], [74, 76, 77, 81]], [[60, 76, 70, 79.5]])
    md = rp.render_markdown(
        ladder, rp.check_targets(ladder), generated_by="GEN", notes="## Notes\nmine\n", recipes="## Recipes\ntheirs"
    )
    order = ["Generated by `GEN`", "## Targets", "## The ladder", "## Recipe variants", "## Notes", "## Recipes",
             "![accuracy vs GFLOPs](ladder.png)"]  # fmt: skip
    positions = [md.index(s) for s in order]
    assert positions == sorted(positions)
    assert "**Not all targets are met:** (a) not checked, (b) NOT met" in md
    assert "| ctf | 2 | 75.00 ± 1.41 | 75.00 ± 1.41 | 76.00 ± 1.41 | 80.00 ± 1.41 | 0.2 |" in md
    assert "| independent | 1 | 60.00 ± — |" in md and "| ctf | +15.00 ± — |" in md
    assert "`train.epochs=6`" in md and "seeds 0, 1, 2" in md


def test_report_writes_the_three_files(tmp_path):
    spec, _ = _ladder([[70, 72, 73, 74]], [[60, 65, 70, 75]])
    jobs = {j.key: j for j in ab.build_jobs(spec)}
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    for key, accs in {"ctf_s0": [70, 72, 73, 74], "ctf_s1": [71, 72, 74, 75], "ctf_T4_s0": [69, 70, 71, 72]}.items():
        rec = ab.run_record(jobs[key], _results({"teammate_a": accs}), [], 30.0)
        ab.write_json(ab.record_path(runs, jobs[key]), rec)
    docs.mkdir(parents=True)
    (docs / "notes.md").write_text("## Discussion\nhand-written\n")
    ladder = ab.report(spec, runs, docs, "python experiments/ablation.py report --spec s.yaml")
    assert json.loads((docs / "ladder.json").read_text()) == ladder
    assert ladder["variants"]["ctf_T4"]["note"] == "T=4" and ladder["variants"]["ctf_T4"]["seeds"] == [0]
    md = (docs / "RESULTS.md").read_text()
    assert "## Discussion\nhand-written" in md and "| ctf_T4 | T=4 | 1 | 69.00 ± — |" in md
    assert (docs / "ladder.png").read_bytes()[:4] == b"\x89PNG"


def test_report_states_the_targets_of_the_other_ladders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, other = _ladder([[72, 74, 76, 79.6]] * 2, [[60, 70, 75, 79]], full_accs=[[30, 60, 77, 80]])
    other["schedule"] = {"data.train_subset": 1000, "train.epochs": 64, "train.eval_train": True}
    (tmp_path / "docs" / "1k").mkdir(parents=True)
    ab.write_json(tmp_path / "docs" / "1k" / "ladder.json", other)
    spec = ab.parse_spec({**_spec_data(), "other_ladders": ["docs/1k", "docs/missing", "docs"]})
    jobs = {j.key: j for j in ab.build_jobs(spec)}
    runs = tmp_path / "runs"
    for key, net, accs in (
        ("ctf_s0", "teammate_a", [70, 72, 73, 74]),
        ("independent_s0", "independent", [60, 75, 70, 75]),
    ):
        ab.write_json(ab.record_path(runs, jobs[key]), ab.run_record(jobs[key], _results({net: accs}), [], 30.0))
    ab.report(spec, runs, "docs", "GEN")
    md = (tmp_path / "docs" / "RESULTS.md").read_text()
    # this page first (70-60, 72-75, 73-70, 74-75; no full_only), then the other one by hand: 72-60, 74-70, 76-75,
    # 79.6-79 and 79.6-80 against the plain net; "docs" itself is not listed twice; eval-only keys are left out
    assert (
        "| this page | `train.epochs=6`, `data.train_subset=8000` | 1 | +10.00 | -3.00 | +3.00 | -1.00 | — | "
        "(a) not checked, (b) NOT met, (c) met |" in md
    )
    assert (
        "| [1k/RESULTS.md](1k/RESULTS.md) | `data.train_subset=1000`, `train.epochs=64` | 2 | +12.00 | +4.00 | "
        "+1.00 | +0.60 | -0.40 | (a) met, (b) met, (c) met |" in md
    )
    assert md.count("| this page |") == 1 and "docs/missing/ladder.json does not exist" in md
    assert md.index("The same targets on the other ladders") < md.index("## The ladder")


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path, fmnist_root):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        json.dumps(
            {
                "command": "smoke",
                "schedule": {"data.train_subset": 8000},
                "seeds": [0],
                "rungs": {
                    r: str(ROOT / "experiments/configs" / c)
                    for r, c in [("full_only", "2_full_only.yaml"), ("ctf", "6_full_ctf.yaml")]
                },
            }  # fmt: skip
        )
    )
    sets = ["train.max_steps=2", "data.train_subset=256", "data.val_subset=200", "train.epochs=1",
            "train.recalibrate_bn=200"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "experiments" / "ablation.py"), "run", "--spec", str(spec), "--jobs", "2",
           "--results", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--runs-dir", str(tmp_path / "work"),
           *(a for s in sets for a in ("--set", s))]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "full_only_s0:" in proc.stdout and "ctf_s0:" in proc.stdout
    ladder = json.loads((tmp_path / "docs" / "ladder.json").read_text())
    assert ladder["command"] == "smoke" and ladder["schedule"]["train.max_steps"] == 2
    assert set(ladder["rungs"]) == {"full_only", "ctf"}
    for rung in ladder["rungs"].values():
        assert rung["seeds"] == [0] and list(rung["top1"]) == list(DEPTHS) and len(rung["train_seconds"]) == 1
    assert (tmp_path / "docs" / "RESULTS.md").is_file() and (tmp_path / "docs" / "ladder.png").is_file()
    assert not (tmp_path / "work" / "ctf_s0" / "checkpoints").exists()
    assert (tmp_path / "work" / "ctf_s0.log").is_file()
    rec = json.loads((tmp_path / "runs" / "ctf_s0.json").read_text())
    assert "--train.max_steps=2" in rec["overrides"] and rec["step"] == 2
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)  # resumed: nothing to do
    assert again.returncode == 0 and "2 of 2 runs done; 0 to run" in again.stdout


def test_variant_is_compared_with_its_baseline_on_its_own_seeds():
    data = _spec_data()
    data["variants"] = [
        {"name": "ctf_T4", "config": "experiments/configs/6_full_ctf.yaml", "overrides": {"coop.temperature": 4.0},
         "seeds": [0, 1], "note": "T=4"},
        {"name": "ctf_T4_a2", "config": "experiments/configs/6_full_ctf.yaml", "seeds": [1], "against": "ctf_T4",
         "overrides": {"coop.temperature": 4.0, "coop.alpha": 2.0}},
    ]  # fmt: skip
    spec = ab.parse_spec(data)
    assert spec.row("ctf_T4").against == "ctf" and spec.row("ctf_T4_a2").against == "ctf_T4"
    accs = {("ctf", 0): [70, 72, 73, 74], ("ctf", 1): [72, 74, 75, 76], ("ctf", 2): [90, 90, 90, 90],
            ("ctf_T4", 0): [71, 71, 71, 71], ("ctf_T4", 1): [73, 73, 73, 73], ("ctf_T4_a2", 1): [74, 74, 74, 74]}  # fmt: skip
    ladder = rp.aggregate(spec, _records(spec, accs))
    md = rp.render_markdown(ladder, rp.check_targets(ladder), generated_by="GEN")
    # ctf on seeds 0 and 1 only (means 71, 73, 74, 75; std 1.41), not on all three: paired with the variant
    row = "| ctf_T4 | T=4 | 2 | 72.00 ± 1.41 | 72.00 ± 1.41 | 72.00 ± 1.41 | 72.00 ± 1.41 | ctf | +1.00 ± 2.00 |"
    assert row.replace("+1.00 ± 2.00", "+1.00 ± 1.41 | -1.00 ± 1.41 | -2.00 ± 1.41 | -3.00 ± 1.41") in md
    assert "| ctf_T4 | +1.00 ± — | +1.00 ± — | +1.00 ± — | +1.00 ± — |" in md  # seed 1: 74 - 73
    base = rp.on_seeds(ladder["rungs"]["ctf"], [2])
    assert base["seeds"] == [2] and base["mean"]["1.0"] == 90 and rp.on_seeds(ladder["rungs"]["ctf"], [5]) is None
    with pytest.raises(ValueError, match="variants.x.against must name a rung or an earlier variant"):
        ab.parse_spec(
            {**data, "variants": [{"name": "x", "config": "experiments/configs/6_full_ctf.yaml", "against": "y"}]}
        )


def test_adopt_moves_records_only_between_rows_that_train_the_same_experiment(tmp_path):
    """A variant that became the default becomes the rung (and the rung's old runs a variant pinning the old value):
    the record's own command, resolved with the code now, must be the target row's."""
    data = _spec_data()
    data["variants"] = [
        {"name": "ctf_T1", "config": "experiments/configs/6_full_ctf.yaml", "overrides": {"coop.temperature": 1.0},
         "seeds": [0, 1]},
        {"name": "ctf_T4", "config": "experiments/configs/6_full_ctf.yaml", "overrides": {"coop.temperature": 4.0},
         "seeds": [0]},
    ]  # fmt: skip
    spec = ab.parse_spec(data)
    made = ab.Job("old_T1", None, 0, "experiments/configs/6_full_ctf.yaml", {**spec.schedule, "coop.temperature": 1.0})
    flags = made.overrides(tmp_path, 1)
    assert "--coop.temperature=1.0" in flags and "--train.seed=0" in flags
    ab.write_json(
        tmp_path / "old_T1_s0.json", ab.run_record(made, _results({"teammate_a": [80, 81, 82, 83]}), flags, 9)
    )
    with pytest.raises(ValueError, match=r"trained another experiment than ctf_T4: coop\.temperature: 1\.0 \(record\)"):
        ab.adopt(spec, tmp_path, "old_T1", "ctf_T4")
    assert ab.adopt(spec, tmp_path, "old_T1", "ctf") == ["ctf_s0.json"]  # T = 1 is the default: the rung
    rec = json.loads((tmp_path / "ctf_s0.json").read_text())
    assert (rec["name"], rec["rung"], rec["adopted_from"]) == ("ctf", "ctf", ["old_T1"])
    assert rec["settings"] == spec.schedule and rec["top1"]["1.0"] == 83
    assert not (tmp_path / "old_T1_s0.json").exists()
    assert ab.stale(ab.build_jobs(spec), tmp_path) == []  # the report takes it as the rung's run
    with pytest.raises(ValueError, match="ctf_s0.json exists"):  # back again: the rung's run is still there
        ab.write_json(tmp_path / "x_s0.json", {**rec, "name": "x"})
        ab.adopt(spec, tmp_path, "x", "ctf")
    assert ab.adopt(spec, tmp_path, "ctf", "ctf_T1") == ["ctf_T1_s0.json"]
    # a row pinning the value its runs had as the default: its records take the row's settings, in place
    pinned = ab.parse_spec({**data, "schedule": {**data["schedule"], "coop.alpha": 1.0}})  # alpha 1: the default
    assert ab.stale(ab.build_jobs(pinned), tmp_path) == ["ctf_T1_s0"]
    assert ab.adopt(pinned, tmp_path, "ctf_T1", "ctf_T1") == ["ctf_T1_s0.json"]
    assert ab.stale(ab.build_jobs(pinned), tmp_path) == [] and (tmp_path / "ctf_T1_s0.json").exists()
    with pytest.raises(ValueError, match="no records nothing_s<seed>.json"):
        ab.adopt(spec, tmp_path, "nothing", "ctf")
    with pytest.raises(ValueError, match="no rung or variant 'ctf_T2'"):
        ab.adopt(spec, tmp_path, "ctf_T1", "ctf_T2")
