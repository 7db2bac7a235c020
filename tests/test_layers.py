"""The layering the package docstrings claim is the layering the code has.

Every package's ``__init__`` docstring says what it may import (``May import:``, our own
packages or modules; its own package and sub-packages always) and which of its modules are pure
(``Pure:``: no asyncio, sockets, processes, Redis, aiortc or HTTP, and only pure modules of
ours). The test reads every import of every module (function-level and ``TYPE_CHECKING``
imports too) and fails on an import a docstring forbids, an impure import in a pure module, an
import of ``tests``, or a cycle between modules.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relay", "transceiver", "pipeline", "loadtest", "deploy")
OURS = (*PACKAGES, "tests")
# What a pure module may not import: I/O, concurrency, and the libraries that do I/O.
IMPURE = {
    "asyncio", "socket", "selectors", "ssl", "subprocess", "multiprocessing", "threading",
    "concurrent", "signal", "http", "urllib", "redis", "aiortc", "aioice", "av", "uvloop",
    "httpx", "httpx2", "openai", "fastapi", "starlette", "uvicorn", "prometheus_client",
    "onnxruntime", "piper", "pocketsphinx", "webrtcvad", "numpy", "soxr", "playwright",
}  # fmt: skip


@dataclass
class Rules:
    """One package's claims, read from its docstring."""

    package: str
    may_import: tuple[str, ...]
    pure: frozenset[str]


@dataclass
class Graph:
    """Module name -> the imports it makes (ours: module names; others: top-level names)."""

    ours: dict[str, set[str]] = field(default_factory=dict)
    external: dict[str, set[str]] = field(default_factory=dict)


def _claim(doc: str, label: str) -> list[str]:
    match = re.search(rf"^{label}:(.*(?:\n[ \t]+\S.*)*)", doc, re.M)
    if match is None:
        return []
    text = match.group(1).replace("(nothing of ours)", "")
    return [name.strip() for name in text.replace("\n", " ").split(",") if name.strip()]


def rules_of(package: str, doc: str) -> Rules:
    if "May import:" not in doc:
        raise AssertionError(f"{package}/__init__ docstring has no 'May import:' line")
    pure = frozenset(f"{package}.{name}" for name in _claim(doc, "Pure"))
    return Rules(package, tuple(_claim(doc, "May import")), pure)


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def read_rules() -> dict[str, Rules]:
    found = {}
    for package in PACKAGES:
        for init in sorted((ROOT / package).rglob("__init__.py")):
            name = module_name(init)
            found[name] = rules_of(name, ast.get_docstring(ast.parse(init.read_text())) or "")
    return found


def imports_of(source: str, modules: Iterable[str]) -> tuple[set[str], set[str]]:
    """(our modules, other top-level names) that ``source`` imports, anywhere in it."""
    known, ours, external = set(modules), set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in known else node.module for name in candidates]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            (ours if top in OURS else external).add(name if top in OURS else top)
    return ours, external


def read_graph() -> Graph:
    """The code's import graph, a copy of its own for each caller (the checker's tests add
    imports to theirs)."""
    parsed = _parsed_graph()
    return Graph(
        {name: set(names) for name, names in parsed.ours.items()},
        {name: set(names) for name, names in parsed.external.items()},
    )


@functools.cache
def _parsed_graph() -> Graph:
    """Every module parsed once for the file's tests (~0.4 CPU-s a parse of all of them, once
    for each of the eight graphs the tests read)."""
    paths = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    names = {module_name(path): path for path in paths}
    graph = Graph()
    for name, path in names.items():
        graph.ours[name], graph.external[name] = imports_of(path.read_text(), names)
    return graph


def governing(module: str, rules: dict[str, Rules]) -> Rules:
    """The rules of the package a module is in (a package's __init__ is in that package)."""
    candidates = [module, *(module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1))]
    return rules[next(name for name in candidates if name in rules)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: Graph, rules: dict[str, Rules]) -> list[str]:
    found = []
    pure = frozenset().union(*(r.pure for r in rules.values()))
    for module, imported in sorted(graph.ours.items()):
        rule = governing(module, rules)
        allowed = (rule.package, *rule.may_import)
        for name in sorted(imported):
            if not any(_within(name, prefix) for prefix in allowed):
                found.append(f"{module} imports {name}: {rule.package} may import {allowed}")
            if module in pure and name not in pure and not _is_package(name, rules):
                found.append(f"{module} is pure but imports {name}, which is not")
        if module in pure:
            found += [f"{module} is pure but imports {name}" for name in sorted(
                graph.external[module] & IMPURE)]  # fmt: skip
    missing = pure - set(graph.ours)
    found += [f"{name} is declared pure but does not exist" for name in sorted(missing)]
    return found + [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]


def _is_package(name: str, rules: dict[str, Rules]) -> bool:
    return name in rules  # importing a package runs only its __init__, checked on its own


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan's algorithm, iterative)."""
    edges = {m: sorted(n for n in targets if n in graph.ours and n != m)
             for m, targets in graph.ours.items()}  # fmt: skip
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                child = edges[node][i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group) + [sorted(group)[0]])
    return groups


def test_every_import_is_one_its_package_docstring_allows() -> None:
    assert violations(read_graph(), read_rules()) == []


def test_nothing_imports_the_tests() -> None:
    graph = read_graph()
    assert {m: n for m, ns in graph.ours.items() for n in ns if _within(n, "tests")} == {}


# The checker itself: each kind of violation is seen when it is added to the real graph.


@pytest.fixture
def real() -> tuple[Graph, dict[str, Rules]]:
    return read_graph(), read_rules()


def added(graph: Graph, rules: dict[str, Rules]) -> list[str]:
    """The violations in ``graph`` that the real code does not have."""
    before = set(violations(read_graph(), rules))
    return [found for found in violations(graph, rules) if found not in before]


def test_a_forbidden_import_is_seen(real: tuple[Graph, dict[str, Rules]]) -> None:
    graph, rules = real
    graph.ours["relay.wire.ufrag"].add("pipeline.chunker")
    assert added(graph, rules) == [
        "relay.wire.ufrag imports pipeline.chunker: relay.wire may import ('relay.wire',)"
    ]


def test_an_impure_import_in_a_pure_module_is_seen(real: tuple[Graph, dict[str, Rules]]) -> None:
    graph, rules = real
    graph.external["relay.wire.header"].add("asyncio")
    graph.ours["relay.wire.stun"].add("relay.http")
    assert added(graph, rules) == [
        "relay.wire.header is pure but imports asyncio",
        "relay.wire.stun imports relay.http: relay.wire may import ('relay.wire',)",
        "relay.wire.stun is pure but imports relay.http, which is not",
    ]


def test_a_cycle_is_seen(real: tuple[Graph, dict[str, Rules]]) -> None:
    graph, rules = real
    graph.ours["relay.wire.header"].add("relay.wire.hello")  # hello imports header already
    assert added(graph, rules) == [
        "import cycle: relay.wire.header -> relay.wire.hello -> relay.wire.header"
    ]


def test_a_package_without_rules_is_refused() -> None:
    with pytest.raises(AssertionError, match="no 'May import:' line"):
        rules_of("somewhere", "A package that says nothing of its imports.")


def test_the_claims_are_read_across_lines() -> None:
    doc = "Text.\n\nMay import: a, b.c,\n    d\nPure: x,\n    y\n"
    assert rules_of("p", doc) == Rules("p", ("a", "b.c", "d"), frozenset({"p.x", "p.y"}))
