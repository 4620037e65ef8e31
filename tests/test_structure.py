"""The package's shape: one-way imports (no cycles, function-level imports included), layers that
never reach up, and functions short enough to read in one screen (at most 60 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unetcli"
LAYERS = {"data": 1, "models": 1, "tracking": 1,
          "planning": 2, "inference": 2, "evaluation": 2, "training": 3, "workflows": 4, "cli": 5, "__main__": 5}
"""Rank of each top-level room; a module may import only modules of a lower or equal rank.
Core modules (errors, config, atomic, runtime, runlock, checkpoint) rank 0. Training ranks above
inference (its validation runs the sliding window); both read checkpoints from the core, so
inference never reaches into training."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """unetcli modules that ``path`` imports anywhere in its body (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("unetcli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unetcli") and node.level == 0:
            for alias in node.names:  # `from unetcli.data import volumes` imports a submodule
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES}


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def rank(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from unetcli.data import volumes\n    import unetcli.errors\n")
    assert imported_modules(source) == {"unetcli.data.volumes", "unetcli.errors"}


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_lower_layers_never_import_higher_ones() -> None:
    upward = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
                    if rank(d) > rank(m) and not d.startswith(m + "."))
    assert upward == []


def test_functions_fit_on_a_screen() -> None:
    """No function over 60 lines, signature and docstring included."""
    too_long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > 60:
                    too_long.append(f"{name}.{node.name} ({length} lines)")
    assert too_long == []
