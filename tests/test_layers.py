"""The packages are floors: extauthz/domain/ (the shared words) at the bottom, storage and
usage above it, the check path, the admin API and Envoy's renders on top. Every import
goes down or sideways, never up: the graph of the project's own imports between packages
(top-level modules counted as their own) has no cycle, and domain/ imports nothing of
the project's but itself."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "extauthz"
GENERATED = "proto"


def unit(path: Path) -> str:
    """The package a module belongs to (a top-level module is its own)."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def target(module: str, names: list[str]) -> list[str]:
    """The units ``from <module> import <names>`` reaches."""
    parts = module.split(".")
    if parts[0] != "extauthz":
        return []
    if len(parts) == 1:  # from extauthz import x
        return names
    return [parts[1]]


def imports() -> dict[str, set[str]]:
    """unit -> the other units its modules import (at any depth: also inside functions
    and under TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if GENERATED in path.relative_to(PACKAGE).parts:
            continue
        here = unit(path)
        reached = graph.setdefault(here, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            found: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = target(node.module, [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                found = [u for a in node.names for u in target(a.name, [])]
            reached.update(u for u in found if u not in (here, GENERATED))
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        trail.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_package_imports_one_that_imports_it_back() -> None:
    found = cycle(imports())
    assert found is None, "an import goes up: " + " -> ".join(found or [])


def test_the_ground_floor_imports_nothing_above_it() -> None:
    assert imports()["domain"] == set()


def test_the_graph_is_read() -> None:  # (the tests above would pass on an empty graph)
    graph = imports()
    assert {"domain", "check", "records", "usage", "admin"} <= graph["app"] | {"app"} | graph["admin"] | {"admin"}
    assert "domain" in graph["records"] and "records" in graph["usage"] and "usage" in graph["check"]
