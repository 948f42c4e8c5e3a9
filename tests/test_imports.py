"""The package's import graph, read from the source: config reads only the plain data of ``choices`` and no
module imports itself back.

Every ``import`` statement counts, wherever it stands (inside a function, under ``TYPE_CHECKING``): an
import moved into a function to dodge a circle is still a circle. An edge goes to the module named
(``from dist_coop.models.adaptive import X`` -> ``dist_coop.models.adaptive``; ``from dist_coop.infer import
commands`` -> ``dist_coop.infer.commands``); the package ``__init__`` a dotted name passes through is not
counted, as Python runs it before the module but the module does not depend on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dist_coop"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every ``.py`` file under dist_coop/."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from ..a import b
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_finds_a_circle():
    """The checker itself: a circle through a function-level import is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "dist_coop.models.adaptive" in graph["dist_coop.models.registry"]
    assert "dist_coop.infer.commands" in graph["dist_coop.cli"]  # imported inside main()


def test_config_reads_only_the_choices_which_import_nothing():
    """Every module may import the config; it loads without torch (the CLI starts fast)."""
    graph = import_graph()
    assert graph["dist_coop.config"] == {"dist_coop.choices"} and graph["dist_coop.choices"] == set()


def test_no_import_circle_in_the_package():
    assert cycles(import_graph()) == []


def test_package_calls_no_api_whose_deprecation_warning_it_ignores():
    """``DEEPSPEED_DEPRECATIONS`` silences warnings about APIs DeepSpeed calls; none may be called from here."""
    from dist_coop.distributed.env import DEEPSPEED_DEPRECATIONS

    names = {"all_gather_into_tensor", "reduce_scatter_tensor", "script_method"}
    assert all(any(n in message for n in names) for _, message in DEEPSPEED_DEPRECATIONS)
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in names:
                calls.append(f"{path.name}:{node.lineno} {node.attr}")
    assert not calls, calls
