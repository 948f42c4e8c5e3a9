"""The README and the pages under docs/: every relative link resolves, the README stays a short user's guide, and
no page points at a spec file that is not part of the project."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MAX_README_LINES = 260

# [text](target) and [text](target "title"); images too (![alt](target)). Code spans are removed first.
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def relative_links(text: str) -> list[str]:
    """The file targets of a page's Markdown links: no external addresses, no pure #anchors, anchors stripped."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(text):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_link_extraction():
    text = (
        "[a](docs/x.md) [b](https://e.org/y.md) [c](#anchor) [d](../z.md#sec) ![e](img.png)"
        ' [f](mailto:a@b.c) [g](p.md "title") `[h](not/a/link.md)`\n```\n[i](fenced.md)\n```\n'
    )
    assert relative_links(text) == ["docs/x.md", "../z.md", "img.png", "p.md"]


def base_folder(page: Path) -> Path:
    """Where a page's links start: its folder. (A ladder's notes.md and recipes.md, which experiments/ablation.py
    inserts into the RESULTS.md beside them, start from the same folder.)"""
    return page.parent


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    missing = [t for t in relative_links(page.read_text()) if not (base_folder(page) / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_is_a_short_guide():
    num_lines = len(README.read_text().splitlines())
    assert num_lines <= MAX_README_LINES, f"README.md has {num_lines} lines (at most {MAX_README_LINES})"


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    assert "bash scripts/quickstart.sh" in text and "bash scripts/test.sh" in text  # .ci/run calls the latter


def test_no_page_refers_to_a_design_spec_outside_the_project():
    pages = [README, *sorted((ROOT / "docs" / "guide").glob("*.md"))]
    design = ROOT / "docs" / "design.md"
    if design.exists():
        pages.append(design)
    offending = [str(p.relative_to(ROOT)) for p in pages if "DESIGN.md" in p.read_text()]
    assert not offending, f"pages that name DESIGN.md (link docs/design.md instead): {offending}"
