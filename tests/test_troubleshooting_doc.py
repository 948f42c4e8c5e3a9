"""docs/guide/troubleshooting.md quotes what dist-coop prints; every quoted line must still be something the code
can print, or the page has drifted from the code.

The page's convention: every line of a ```text block is a line dist-coop prints (or writes into MLflow), copied
from the code's messages, with ``<...>`` standing for a part that varies (a path, a step). Another tool's output
(torch, the kernel, torchrun) goes in a plain ``` block and is not checked.

The code's message templates are read with ``ast``: string literals, f-strings (each ``{...}`` a part that
varies) and sums of them (``f"..." + (a if x else b)``). A quoted line must match one template whole (its fixed
words in place, so a reworded message or a placeholder over fixed words fails), and the fixed text of that
template, with that of the templates found inside its varying parts (a message built from smaller ones), must
make up most of the line: a template that fixes only a prefix (``f"MLflow store {uri}: could not {doing}: {e}"``)
does not vouch for the rest.
"""

from __future__ import annotations

import ast
import itertools
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guide" / "troubleshooting.md"
PREFIXES = ("dist-coop: error: ", "dist-coop: ")  # what cli.main puts before an exception's message
PLACEHOLDER = re.compile(r"<[^<>]*>")
MIN_FIXED = 12  # a whole-line template fixes this many characters beyond a prefix ("{a}: {b}" fixes nothing)
MIN_INNER = 6  # a template found inside a varying part fixes at least this many
MIN_SHARE = 0.6  # of a quoted line's characters (placeholders aside), the share the templates fix


def _parts(node: ast.AST) -> list[list[str | None]]:
    """The ways ``node`` can read as text: each a list of fixed strings and None (a part that varies)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [[node.value]]
    if isinstance(node, ast.JoinedStr):
        return [[v.value if isinstance(v, ast.Constant) else None for v in node.values]]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [a + b for a, b in itertools.product(_parts(node.left), _parts(node.right))][:64]
    if isinstance(node, ast.IfExp):
        return _parts(node.body) + _parts(node.orelse)
    return [[None]]


class Template:
    def __init__(self, parts: list[str | None]) -> None:
        merged: list[str | None] = []  # adjacent fixed strings joined, adjacent varying parts as one
        for p in parts:
            if merged and (p is None) == (merged[-1] is None):
                merged[-1] = merged[-1] + p if p is not None else None
            else:
                merged.append(p)
        self.fixed_at = [p is not None for p in merged]  # per regex group: fixed text or a varying part
        self.fixed = "".join(p for p in merged if p)
        self.longest = max((p for p in merged if p), key=len, default="")
        self.pattern = re.compile("".join(f"({re.escape(p)})" if p else "(.*?)" for p in merged), re.S)


@cache
def templates() -> list[Template]:
    found = []
    for path in sorted((ROOT / "dist_coop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                found += [t for t in map(Template, _parts(node)) if len(t.fixed) >= MIN_INNER]
    return found


def _own(text: str) -> int:
    """The characters of ``text`` outside placeholders."""
    return len(PLACEHOLDER.sub("", text))


def _fixed_inside(text: str) -> int:
    """How many characters of ``text`` (placeholders aside) the fixed parts of templates found in it cover."""
    covered: set[int] = set()
    for t in templates():
        if t.longest in text:
            for m in t.pattern.finditer(text):
                covered.update(i for g, fixed in enumerate(t.fixed_at, 1) if fixed for i in range(*m.span(g)))
    held = {i for m in PLACEHOLDER.finditer(text) for i in range(*m.span())}
    return len(covered - held)


def share_fixed(line: str) -> float:
    """The largest share of ``line`` that a template matching it whole (with those inside its varying parts)
    fixes; 0.0 when no template matches it."""
    best = 0.0
    for text in [line] + [line[len(p) :] for p in PREFIXES if line.startswith(p)]:
        for t in templates():
            fixed = t.fixed
            for prefix in PREFIXES:
                fixed = fixed.removeprefix(prefix)
            if len(fixed) < MIN_FIXED or t.longest not in text or not (m := t.pattern.fullmatch(text)):
                continue
            inner = sum(_fixed_inside(m.group(g)) for g, is_fixed in enumerate(t.fixed_at, 1) if not is_fixed)
            best = max(best, (len(t.fixed) + inner) / max(1, _own(text)))
    return best


def in_source(line: str) -> bool:
    """Can the code print ``line`` (``<...>`` in it standing for values)?"""
    return share_fixed(line) >= MIN_SHARE


def quoted_lines(text: str) -> list[str]:
    """The lines of the page's ```text blocks."""
    return [
        line
        for block in re.findall(r"^```text\n(.*?)^```", text, re.M | re.S)
        for line in block.splitlines()
        if line.strip()
    ]


def test_the_checker_tells_a_real_message_from_a_changed_one():
    real = (
        "dist-coop: error: non-finite loss of leader at step 2 (train.on_nonfinite: error); lower optim.lr or "
        "optim.grad_clip, or set train.on_nonfinite: skip to drop such steps"
    )
    assert in_source(real)
    assert in_source(real.replace("leader at step 2", "<net> at step <step>"))
    assert not in_source(real.replace("lower optim.lr", "raise optim.lr"))  # words the code does not print
    assert not in_source(real.replace("(train.on_nonfinite: error)", "<why>"))  # a placeholder over fixed words
    assert not in_source("dist-coop: error: something went wrong")  # the bare prefix is no template
    store = (
        "dist-coop: error: MLflow store <uri>: could not log the metrics of step <step>: the disk of <db>, <mount> "
        "(<fs>), <n> bytes free is full; free space there, or set tracking.uri to a store on another disk "
        "(tracking.backend: none to train without tracking)"
    )
    assert in_source(store)
    # the generic store template (f"MLflow store {uri}: could not {doing}: {error}") matches a changed line whole,
    # but fixes too little of it to vouch for it
    assert not in_source(store.replace("free space there", "make room there"))
    assert quoted_lines("a\n```text\nline one\n\nline two\n```\n```\nnot checked\n```\n") == ["line one", "line two"]


def test_every_quoted_line_is_printed_by_the_code():
    lines = quoted_lines(PAGE.read_text())
    assert len(lines) >= 20
    drifted = [line for line in lines if not in_source(line)]
    assert not drifted, "docs/guide/troubleshooting.md quotes lines the code does not print:\n" + "\n".join(drifted)


def test_every_topic_has_its_section_and_links_resolve():
    text = PAGE.read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    for topic in (
        "diverged",
        "preempted",
        "node",
        "timeout",
        "shard",
        "RUNNING",
        "run folder",
        "disk",
        "memory",
        "data",
    ):
        assert any(topic.lower() in h.lower() for h in headings), topic
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert "../RELIABILITY.md" in links
    for link in links:
        if "://" not in link:
            assert (PAGE.parent / link).exists(), link
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}  # GitHub's heading anchors
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in slugs, anchor
