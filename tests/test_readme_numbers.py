"""The README's accuracy figures are the committed ladder JSON's (docs/results/<ladder>/ladder.json), so they cannot
drift from the pages they quote: every `mean ± std` cell of its two tables and the differences it states."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEPTHS = ("0.25", "0.5", "0.75", "1.0")
ROWS = {  # README row label -> rung
    "nets trained alone, one per depth": "independent",
    "plain net, truncated": "full_only",
    "cooperative (CTF)": "ctf",
    "one Teammate, no Leader (`sfsl`)": "sfsl",
}


def ladder(name: str) -> dict:
    return json.loads((ROOT / "docs" / "results" / name / "ladder.json").read_text())["rungs"]


def cell(rung: dict, depth: str) -> str:
    return f"{rung['mean'][depth]:.2f} ± {rung['std'][depth]:.2f}"


def table_rows(header: str) -> list[list[str]]:
    """The rows (cells stripped) of the README table whose header line starts with ``header``."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_the_opening_table_is_the_main_ladder():
    rungs = ladder("8k")
    rows = table_rows("| depth s |")
    assert [r[0] for r in rows] == ["0.25", "0.5", "0.75", "1"]
    for row, depth in zip(rows, DEPTHS, strict=True):
        assert row[2] == f"{rungs['ctf']['gflops'][depth]:.4f}"
        assert row[4] == cell(rungs["ctf"], depth) and row[5] == cell(rungs["full_only"], depth), row


@pytest.mark.parametrize("ladder_name", ["8k", "1k"])
def test_the_results_table_is_the_ladders_json(ladder_name):
    rungs = ladder(ladder_name)
    rows, current, seen = table_rows("| ladder | net |"), None, 0
    for row in rows:
        if row[0]:
            current = row[0]
        if current.startswith(f"{ladder_name} images"):
            rung = rungs[ROWS[row[1]]]
            assert row[2:] == [cell(rung, d) for d in DEPTHS], row
            assert f"{len(rung['seeds'])} seeds" in current
            seen += 1
    assert seen >= 3


@pytest.mark.parametrize(
    ("ladder_name", "quoted"), [("8k", "-0.19 / -0.88 / -0.50 / -0.68"), ("1k", "+0.79 / +0.52 / +1.35 / +1.04")]
)
def test_the_stated_differences_are_the_ladders_json(ladder_name, quoted):
    rungs = ladder(ladder_name)
    diffs = " / ".join(f"{rungs['ctf']['mean'][d] - rungs['independent']['mean'][d]:+.2f}" for d in DEPTHS)
    assert diffs == quoted and quoted in README
    plain = rungs["ctf"]["mean"]["1.0"] - rungs["full_only"]["mean"]["1.0"]
    said = re.search(rf"{abs(plain):.2f} (below|above) the\s+plain net", README[README.index(quoted) :])
    assert said and said.group(1) == ("above" if plain > 0 else "below")


def test_the_fine_tuning_line_is_the_studys_json():
    """The recipe's paired differences against the nets trained alone and the plain net, and its cost, as the README
    states them, recomputed from docs/results/finetune/finetune.json."""
    study = json.loads((ROOT / "docs" / "results" / "finetune" / "finetune.json").read_text())
    lad = study["ladders"]["8k"]
    recipe, alone, plain = lad["rows"]["ft_e4_lr05"], lad["baselines"]["independent"], lad["rows"]["plain"]

    def paired(a: dict, b: dict, depth: str) -> float:
        pairs = [(a["top1"][depth][i], b["top1"][depth][b["seeds"].index(s)]) for i, s in enumerate(a["seeds"])]
        return sum(x - y for x, y in pairs) / len(pairs)

    said = f"({' / '.join(f'{paired(recipe, alone, d):+.2f}' for d in DEPTHS[1:])})"
    assert said in README, said
    assert f"above the plain net at s = 1 ({paired(recipe, plain, '1.0'):+.2f})" in README
    assert f"{-paired(recipe, alone, '0.25'):.2f}\n  below at s = 0.25" in README
    cost = study["cost"]["seconds_per_epoch"]
    epochs, schedule = recipe["overrides"]["train.epochs"], study["cost"]["epochs_of_schedule"]
    mean = {name: sum(v) / len(v) for name, v in cost.items()}
    ratio = epochs * mean["recipe"] / (schedule * mean["independent_timed"])
    assert f"in {ratio:.2f}x the training time of the four nets" in README
