"""A sweep spec (plain YAML): the schedule applied to every run, the seeds, the rung configs and the recipe variants,
read and checked before anything trains. Read by the sweep (ablation.py) and its report (ablation_report.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_coop.config import did_you_mean

RUNGS = ("independent", "full_only", "self_learning", "sfsl", "interactive", "ctf")
SPEC_KEYS = ("command", "docs", "records", "schedule", "seeds", "rungs", "variants", "other_ladders")
VARIANT_KEYS = ("name", "config", "overrides", "seeds", "note", "against")


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
    against: str = "ctf"  # a variant is compared with this row, on the variant's seeds (paired)


@dataclass(frozen=True)
class Spec:
    command: str
    schedule: dict[str, Any]
    seeds: tuple[int, ...]
    rows: tuple[Row, ...]
    other_ladders: tuple[str, ...] = ()  # page folders of other ladders whose targets the report states too
    docs: str = ""  # the page folder: RESULTS.md, ladder.json, ladder.png, notes.md, recipes.md
    records: str = ""  # the per-run JSON folder

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def nearest(key: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` (the nearest valid name), or the valid names when there are none."""
    return did_you_mean(key, valid) or f"; valid: {list(valid)}"


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


def _check_keys(where: str, mapping: Mapping[str, Any], valid: Sequence[str]) -> None:
    for key in mapping:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}{nearest(str(key), valid)}")


def parse_spec(data: Any, sets: Mapping[str, Any] | None = None) -> Spec:
    """Validate a spec mapping (as read from YAML); ``sets`` override schedule entries (``--set``)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a sweep spec must be a mapping, got {type(data).__name__}")
    _check_keys("spec", data, SPEC_KEYS)
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
            raise ValueError(f"rungs: unknown rung {name!r}{nearest(str(name), RUNGS)}")
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
        _check_keys(where, v, VARIANT_KEYS)
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
        against = v.get("against", "ctf")
        if against not in RUNGS and not any(r.name == against for r in rows):
            raise ValueError(f"{where}.against must name a rung or an earlier variant, got {against!r}")
        rows.append(
            Row(
                name=name,
                config=_config(f"{where}.config", v["config"]),
                rung=None,
                against=against,
                seeds=_seeds(f"{where}.seeds", v["seeds"]) if "seeds" in v else seeds,
                overrides=_settings(f"{where}.overrides", v.get("overrides")),
                note=note,
            )
        )
    others = data.get("other_ladders") or []
    if not isinstance(others, list) or any(not isinstance(o, str) or not o for o in others):
        raise ValueError(f"other_ladders must be a list of docs folders (such as docs/results/1k), got {others!r}")
    folders = {}
    for key in ("docs", "records"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a folder path (a string), got {value!r}")
        folders[key] = value
    return Spec(
        command=command, schedule=schedule, seeds=seeds, rows=tuple(rows), other_ladders=tuple(others), **folders
    )


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
