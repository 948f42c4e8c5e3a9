"""The fine-tuning study (experiments/finetune_study.py): spec, ordering, sources kept, targets, page."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_experiment

ROOT = Path(__file__).resolve().parents[1]
fs = load_experiment("finetune_study")
DEPTHS = ("0.25", "0.5", "0.75", "1.0")


def _spec(**changes):
    data = {
        "command": "smoke",
        "docs": "page",
        "records": "records",
        "seeds": [0, 1],
        "rows": [
            {"name": "plain", "config": "experiments/configs/2_full_only.yaml", "stage": "source", "keep": True},
            {"name": "independent_timed", "config": "experiments/configs/1_independent.yaml", "stage": "timing"},
        ],
        "ladders": [
            {"name": "8k", "schedule": {"train.epochs": 8}, "records": "base",
             "baselines": {"independent": "independent", "ctf": "ctf"},
             "rows": [{"name": "ft", "config": "configs/finetune/quickstart_finetune.yaml", "init_from": "plain",
                       "overrides": {"train.epochs": 2}}]},
        ],
    }  # fmt: skip
    data.update(changes)
    return data


def test_spec_jobs_and_sources():
    study = fs.parse_study(_spec())
    jobs = fs.study_jobs(study)
    assert [j.key for j in jobs] == [f"8k/{n}_s{s}" for s in (0, 1) for n in ("plain", "independent_timed", "ft")]
    ft = next(j for j in jobs if j.row.name == "ft")
    assert ft.job.settings == {"train.epochs": 2} and ft.row.init_from == "plain"


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"name": "ft", "config": "c.yaml", "init_from": "nope"}], "init_from 'nope' is not a row"),
        ([{"name": "ft", "config": "c.yaml", "init_from": "independent_timed"}], "must have keep: true"),
        ([{"name": "ft", "config": "c.yaml", "stage": "later"}], "stage must be one of"),
        ([{"name": "ft", "config": "c.yaml", "epochs": 2}], "unknown key 'epochs'"),
    ],
)
def test_spec_errors(rows, match):
    data = _spec()
    data["ladders"][0]["rows"] = rows
    with pytest.raises(ValueError, match=match):
        fs.parse_study(data)


def test_a_source_whose_checkpoints_are_gone_is_run_again_before_its_dependents(tmp_path):
    study = fs.parse_study(_spec(docs=str(tmp_path / "page"), records=str(tmp_path / "records")))
    jobs = fs.study_jobs(study)
    for sj in jobs:
        if sj.row.name in ("plain", "independent_timed"):  # finished: records exist
            fs.write_json(fs.record_file(study, sj), {"name": sj.row.name})
    todo = fs.todo_jobs(study, jobs, tmp_path / "work")
    assert [j.key for j in todo] == ["8k/plain_s0", "8k/plain_s1", "8k/ft_s0", "8k/ft_s1"]
    (tmp_path / "work" / "8k" / "plain_s1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "work" / "8k" / "plain_s1" / "checkpoints" / "latest").write_text("step_00000002\n")
    assert [j.key for j in fs.todo_jobs(study, jobs, tmp_path / "work")] == ["8k/plain_s0", "8k/ft_s0", "8k/ft_s1"]


def _summary(seeds, top1, seconds):
    return fs.summarise(
        {s: {"top1": dict(zip(DEPTHS, accs)), "train_seconds": t} for s, accs, t in zip(seeds, top1, seconds)}
    )


def test_targets_by_hand():
    lad = {
        "rows": {
            "plain": _summary([0, 1], [[60, 70, 80, 90], [62, 72, 82, 92]], [100, 100]),
            "independent_timed": _summary([0, 1], [[80, 85, 88, 90], [80, 85, 88, 90]], [400, 420]),
            "ft": _summary([0, 1], [[85, 87, 89, 91], [83, 85, 87, 91]], [150, 170]),
        },
        "baselines": {"independent": _summary([0, 1, 2], [[82, 86, 88, 90]] * 3, [1, 1, 1])},
    }
    (g1, met1, d1), (g2, met2, d2), (g3, met3, d3) = fs.targets(lad, "ft")
    # ft means 84, 86, 88, 91 against 82, 86, 88, 90: equal counts as met
    assert met1 and "s=0.25: +2.00" in d1 and "s=0.5: +0.00" in d1
    # at s=1 ft minus plain: 91-90 = +1, 91-92 = -1 -> mean 0, std sqrt(2)
    assert met2 and d2.startswith("+0.00 ± 1.41") and "(1/2 seeds" in d2
    # 160 s against 410 s
    assert met3 and d3 == "160 s vs 410 s: 0.39x"
    lad["rows"]["ft"] = _summary([0, 1], [[81, 87, 89, 89], [81, 85, 87, 89]], [300, 300])
    (_, met1, d1), (_, met2, _), (_, met3, d3) = fs.targets(lad, "ft")
    assert not met1 and "s=0.25: -1.00" in d1
    assert not met2 and not met3 and d3.endswith("0.73x")


def test_study_end_to_end(tmp_path, fmnist_root):
    """Two real seeds' worth of tiny runs: the plain net keeps its checkpoints, the fine-tuning run starts from
    the plain run of its own seed, the page states the targets; rerunning has nothing to do."""
    base = tmp_path / "base"
    base.mkdir()
    for name in ("independent", "ctf"):
        for s in (0,):
            rec = {"name": name, "seed": s, "top1": dict.fromkeys(DEPTHS, 50.0), "train_seconds": 1.0}
            (base / f"{name}_s{s}.json").write_text(json.dumps(rec))
    tiny = {"train.max_steps": 2, "data.train_subset": 256, "data.val_subset": 200, "train.epochs": 1}
    data = _spec(docs=str(tmp_path / "page"), records=str(tmp_path / "records"), seeds=[0], command="smoke")
    data["rows"][0]["config"] = str(ROOT / data["rows"][0]["config"])
    data["rows"][0]["overrides"] = {"train.recalibrate_bn": 200}
    data["rows"] = data["rows"][:1]
    lad = data["ladders"][0]
    lad.update(schedule=tiny, records=str(base))
    timing = {"name": "independent_timed", "config": str(ROOT / "experiments/configs/1_independent.yaml")}
    lad["rows"].append({**timing, "stage": "timing"})
    lad["rows"][0].update(config=str(ROOT / lad["rows"][0]["config"]), overrides={})
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(data))
    cmd = [sys.executable, str(ROOT / "experiments" / "finetune_study.py"), "run", "--spec", str(spec), "--jobs", "2",
           "--runs-dir", str(tmp_path / "work")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "work" / "8k" / "plain_s0" / "checkpoints" / "latest").is_file()  # kept: a source
    assert not (tmp_path / "work" / "8k" / "ft_s0" / "checkpoints").exists()
    rec = json.loads((tmp_path / "records" / "8k" / "ft_s0.json").read_text())
    assert f"--model.init={tmp_path / 'work' / '8k' / 'plain_s0'}" in rec["overrides"] and rec["step"] == 2
    log = (tmp_path / "work" / "8k" / "ft_s0.log").read_text()
    assert "model.init:" in log and "plain_s0/checkpoints/step_00000002 net teammate_a" in log
    agg = json.loads((tmp_path / "page" / "finetune.json").read_text())
    assert set(agg["ladders"]["8k"]["rows"]) == {"plain", "independent_timed", "ft"}
    assert agg["ladders"]["8k"]["baselines"]["ctf"]["mean"]["1.0"] == 50.0
    page = (tmp_path / "page" / "RESULTS.md").read_text()
    assert "### Targets" in page and "Teammate A >= the nets trained alone at every depth" in page
    assert page.index("### Targets") < page.index("### Accuracy per depth")
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 run(s) to do" in again.stdout
    cost_cmd = [
        *cmd[:2],
        "cost",
        "--spec",
        str(spec),
        "--ladder",
        "8k",
        "--repeats",
        "1",
        "--runs-dir",
        str(tmp_path / "work"),
    ]
    timed = subprocess.run(cost_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert timed.returncode == 0, timed.stdout[-3000:] + timed.stderr[-3000:]
    cost = json.loads((tmp_path / "page" / "cost.json").read_text())
    assert set(cost["seconds_per_epoch"]) == {"plain", "independent_timed", "recipe"}
    assert all(len(v) == 1 and v[0] > 0 for v in cost["seconds_per_epoch"].values())
    page = (tmp_path / "page" / "RESULTS.md").read_text()
    assert "### Cost, timed one run at a time" in page and "| row | epochs | fine-tuning s |" in page


def test_cost_section_by_hand():
    cost = {
        "command": "CMD",
        "threads": 1,
        "repeats": 2,
        "cpu": "a CPU",
        "epochs_of_schedule": 8,
        "seconds_per_epoch": {"plain": [10.0, 12.0], "independent_timed": [50.0, 50.0], "recipe": [19.0, 21.0]},
    }
    rows = {
        "plain": {"stage": "source", "overrides": {}},
        "ft_e2": {"stage": "final", "overrides": {"train.epochs": 2}},
        "ft_e4": {"stage": "final", "overrides": {"train.epochs": 4}},
    }
    text = "\n".join(fs.cost_lines(cost, rows, "CMD"))
    # alone: 50 x 8 = 400 s; plain: 11 x 8 = 88 s; recipe 20 s per epoch
    assert "| the four nets trained alone | 50.00 ± 0.00 | 400 |" in text
    assert "| the plain net | 11.00 ± 1.41 | 88 |" in text
    assert "| ft_e2 | 2 | 40 | 0.10x | 128 | 0.32x |" in text
    assert "| ft_e4 | 4 | 80 | 0.20x | 168 | 0.42x |" in text
    assert "on a CPU" in text and "`CMD`" in text
