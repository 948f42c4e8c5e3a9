"""``dist-coop config``: every setting with its type, default, values and meaning, read from the config
dataclasses themselves (each field's metadata, ``dist_coop.config.opt``). The same listing, as Markdown, is
docs/guide/config.md: ``dist-coop config --markdown > docs/guide/config.md``.

The recipe's settings come first; the research switches (``opt(..., research=True)``: they exist for the
ablations of docs/results/8k/RESULTS.md, their defaults are the recipe) are listed apart: after the recipe's settings of
their section in the terminal, in a part of their own after every section on the page.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from dist_coop.config import SECTIONS, Config, load_config, parse_overrides, setting_path

RESEARCH = "research switches (for the ablations of docs/results/8k/RESULTS.md; their defaults are the recipe)"
RESEARCH_HEADING = "Research switches (used by the ladders in docs/results/8k/RESULTS.md)"
GUIDE = "docs/guide/config.md"


@dataclass(frozen=True)
class Setting:
    key: str  # "optim.lr": what a YAML section holds and what an override names
    type: str  # "float", "list of float", "mapping", ...
    default: Any
    choices: tuple[Any, ...]  # () = any value of the type (within the checks of its section)
    meaning: str
    research: bool


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return f"list of {item.__name__}"
    return "mapping" if hint is dict else hint.__name__


def settings(section: str) -> list[Setting]:
    """The settings of ``section``: the recipe's first, then the research switches, each group in field order."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append(
            Setting(
                key=f"{section}.{f.name}",
                type=_type_name(hints[f.name]),
                default=default,
                choices=f.metadata["choices"],
                meaning=f.metadata["meaning"],
                research=f.metadata["research"],
            )
        )
    return sorted(out, key=lambda s: s.research)  # stable: field order within each group


def section_meaning(section: str) -> str:
    """The first paragraph of the section's docstring, on one line."""
    doc = SECTIONS[section].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def format_value(value: Any) -> str:
    """A value as it is written in YAML or an override: ``true``, ``""``, ``[0.25, 1.0]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


def _selected(names: Sequence[str]) -> dict[str, list[Setting]]:
    """``names`` (sections or section.key, none = all) -> the settings to show, grouped by section."""
    if not names:
        return {section: settings(section) for section in SECTIONS}
    chosen: dict[str, list[Setting]] = {}
    for name in names:
        section, key = setting_path(name)
        rows = [s for s in settings(section) if key is None or s.key == name]
        chosen.setdefault(section, []).extend(s for s in rows if s not in chosen.get(section, []))
    return chosen


def changed_keys(cfg: Config) -> list[str]:
    """The settings of ``cfg`` whose value is not the default."""
    defaults = Config().flat()
    return [key for key, value in cfg.flat().items() if value != defaults[key]]


def _value_line(setting: Setting, values: dict[str, Any] | None, changed: Sequence[str] = ()) -> str:
    """``  optim.lr = 0.1  (float)``; a value of ``values`` that is not the default: ``* ... ; default 0.1)``."""
    kind = setting.type + (": " + " | ".join(format_value(c) for c in setting.choices) if setting.choices else "")
    value = setting.default if values is None else values[setting.key]
    if setting.key not in changed:
        return f"  {setting.key} = {format_value(value)}  ({kind})"
    return f"* {setting.key} = {format_value(value)}  ({kind}; default {format_value(setting.default)})"


def listing(names: Sequence[str] = (), cfg: Config | None = None, *, changed: bool = False, width: int = 100) -> str:
    """The terminal listing: per section, each setting's ``key = value (type: choices)`` and its meaning below.

    With ``cfg``: its values, ``*`` marking those that are not the default (``changed``: only these)."""
    out = []
    values = cfg.flat() if cfg is not None else None
    changed_now = changed_keys(cfg) if cfg is not None else []
    for section, rows in _selected(names).items():
        lines = []
        for research in (False, True):
            group = [s for s in rows if s.research == research]
            if changed:
                group = [s for s in group if s.key in changed_now]
            if group and research:
                lines.append(f"  -- {RESEARCH} --")
            for s in group:
                lines.append(_value_line(s, values, changed_now))
                lines.extend(textwrap.wrap(s.meaning, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
        if lines or not changed:
            out.append(f"[{section}] {section_meaning(section)}\n" + "\n".join(lines))
    return "\n\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "\\<")


INTRO = """\
# Every setting

<!-- Generated from dist_coop/config.py by `dist-coop config --markdown > docs/guide/config.md`;
tests/test_config_doc.py fails when this page is stale. Edit the meanings there, not here. -->

A run is configured by a plain YAML file, one mapping per section (`dist-coop train --config my.yaml`), and by
overrides on the command line, `--section.key=value`, the value read as YAML (`--coop.scaling_factors=[0.5,1]`).
Every value is checked when the config loads: an unknown key is refused naming the nearest valid one, a bad value
naming the setting and what it takes.

The same list in a terminal: `dist-coop config` (every section), `dist-coop config optim` (one section),
`dist-coop config optim.lr` (one setting). `dist-coop config --config my.yaml --optim.lr=0.05` shows the values a
run would use, `*` marking those that are not the default (`--changed`: only these).

Each section below lists the recipe's settings: what a run of your own sets. The research switches come apart,
after every section, under [Research switches](#research-switches-used-by-the-ladders-in-docsresultsmd): they
exist for the ablation ladders ([docs/results/8k/RESULTS.md](../results/8k/RESULTS.md)), and their defaults are the recipe.
"""


def _table(rows: list[Setting]) -> list[str]:
    lines = ["| setting | type | default | values | meaning |", "|---|---|---|---|---|"]
    for s in rows:
        values = ", ".join(f"`{format_value(c)}`" for c in s.choices)
        lines.append(f"| `{s.key}` | {s.type} | `{format_value(s.default)}` | {values} | {_cell(s.meaning)} |")
    return lines


def markdown() -> str:
    """docs/guide/config.md: every section's recipe settings as a table, then the research switches, a table per
    section that has them."""
    research = {section: [s for s in settings(section) if s.research] for section in SECTIONS}
    research = {section: rows for section, rows in research.items() if rows}
    lines = [INTRO, "Sections: " + ", ".join(f"[{section}](#{section})" for section in SECTIONS) + "."]
    for section in SECTIONS:
        lines += ["", f"## {section}", "", section_meaning(section), ""]
        lines += _table([s for s in settings(section) if not s.research])
        if section in research:
            lines += ["", f"Research switches of this section: [{section}](#research-{section})."]
    lines += ["", f"## {RESEARCH_HEADING}", ""]
    lines += [
        "Each exists for a row of the ablation ladders, which set it in their `overrides:` (experiments/configs/); "
        "its default is the recipe."
    ]
    for section, rows in research.items():
        lines += ["", f"### research: {section}", ""]
        lines += _table(rows)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def add_parser(sub: Any, parents: list[argparse.ArgumentParser] | None = None) -> None:
    p = sub.add_parser(
        "config",
        parents=parents or [],
        help="list every setting: its type, default, values and meaning (one section: dist-coop config optim)",
        usage="dist-coop config [SECTION | SECTION.KEY ...] [--config C] [--section.key=value ...] [--changed] "
        "[--markdown]",
        description="Every setting of a run with its type, default, values and meaning. SECTION: "
        f"{', '.join(SECTIONS)}; SECTION.KEY: one setting (optim.lr). With --config or overrides: the values a run "
        "would use, * marking those that are not the default.",
    )
    p.add_argument("--config", default=None, help="show the values this YAML config (and the overrides) resolve to")
    p.add_argument("--changed", action="store_true", help="with --config or overrides: only the changed settings")
    p.add_argument("--markdown", action="store_true", help=f"every setting as Markdown ({GUIDE})")


def _names_and_overrides(rest: Sequence[str]) -> tuple[list[str], list[str]]:
    """``["optim", "--optim.lr", "0.05", "train"]`` -> ``(["optim", "train"], ["--optim.lr", "0.05"])``."""
    names: list[str] = []
    overrides: list[str] = []
    items = list(rest)
    i = 0
    while i < len(items):
        if items[i].startswith("-"):
            takes_next = "=" not in items[i] and i + 1 < len(items)
            overrides += items[i : i + 1 + takes_next]
            i += 1 + takes_next
        else:
            names.append(items[i])
            i += 1
    return names, overrides


def config_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    names, overrides = _names_and_overrides(rest)
    if args.markdown:
        if names or overrides or args.config or args.changed:
            raise ValueError(f"--markdown writes every default ({GUIDE}); leave out the names, --config and overrides")
        sys.stdout.write(markdown())
        return 0
    for name in names:
        setting_path(name)  # an unknown name is refused before the config is read
    cfg = load_config(args.config, overrides) if args.config or overrides else None
    if args.changed and cfg is None:
        raise ValueError("--changed compares a config with the defaults; give --config or --section.key=value")
    if cfg is not None:
        count = sum(len(values) for values in parse_overrides(overrides).values())
        given = (args.config or "the defaults") + (f" with {count} override(s)" if count else "")
        print(f"# the values of {given}; * = not the default ({len(changed_keys(cfg))} of {len(cfg.flat())} settings)")
    sys.stdout.write(listing(names, cfg, changed=args.changed))
    return 0
