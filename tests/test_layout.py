"""The layout the README promises: no import cycle in the product code, and ``model/`` imports only the MoCo core.

Imports are read from the source (every ``import`` statement, including the lazy ones inside functions), so a
cycle hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PRODUCT_PACKAGES = ("shards", "pipeline", "model", "eval", "training")
PRODUCT_MODULES = ("train", "config", "cli", "distributed", "demo")
# What model/ may import from this repository: itself and the collectives module (rank, world size, all-gather).
MODEL_MAY_IMPORT = ("model", "distributed")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the product code (packages' ``__init__`` under the package name)."""
    modules: dict[str, Path] = {}
    for package in PRODUCT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    for name in PRODUCT_MODULES:
        if (REPO / f"{name}.py").is_file():
            modules[name] = REPO / f"{name}.py"
    return modules


def imported_names(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Edges between product modules: ``a -> b`` when a imports b (a submodule import does not imply the
    package's ``__init__``, which is how Python resolves it once the package is loaded)."""
    modules = project_modules()
    return {name: {m for m in imported_names(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_product_code_has_no_import_cycle():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_model_imports_only_the_moco_core():
    modules = project_modules()
    outside = {}
    for name, path in modules.items():
        if name.split(".")[0] != "model":
            continue
        foreign = {m for m in imported_names(path) if m in modules and m.split(".")[0] not in MODEL_MAY_IMPORT}
        if foreign:
            outside[name] = sorted(foreign)
    assert not outside, f"model/ imports outside the core: {outside}"


def test_product_code_does_not_import_benchmarks_or_tests():
    offenders = {name: sorted(m for m in imported_names(path) if m.split(".")[0] in ("benchmarks", "tests"))
                 for name, path in project_modules().items()}
    assert not {k: v for k, v in offenders.items() if v}
