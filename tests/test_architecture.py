"""The house's layers: import-linter contracts (pyproject.toml) and no import circles between modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "tasks", "flows")


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "3 kept" in done.stdout


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_circle_finder_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_between_modules() -> None:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    edges = {
        module: {m for m in graph.find_modules_directly_imported_by(module) if m.split(".")[0] in PACKAGES}
        for module in graph.modules
        if module.split(".")[0] in PACKAGES
    }
    # a package's __init__ that re-exports its modules is not a circle of code
    edges = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in edges.items()}
    assert circles(edges) == []


def local_stdlib_imports(source: str) -> list[str]:
    """``import`` statements of standard-library modules made inside a function."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if name and name.split(".")[0] in sys.stdlib_module_names:
                        found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_function_local_imports_are_only_for_heavy_modules() -> None:
    """Imports inside functions keep the CLI and light steps from loading torch, Ray, MLflow or
    Prefect; the standard library is cheap and is imported at the top of the module."""
    assert local_stdlib_imports("def f():\n    import os\n") == ["2: import os"]
    found = {
        str(path.relative_to(REPO)): hits
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if (hits := local_stdlib_imports(path.read_text(encoding="utf-8")))
    }
    assert not found, found
