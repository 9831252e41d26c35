"""The project's modules form layers: no import cycle, imports inside functions included, and no
entry point edits sys.path."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Installed packages: qat (qat/), and its lm-eval integration qat.eval (eval/).
PACKAGES = {"qat": ROOT / "qat", "qat.eval": ROOT / "eval"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *rel[:-1])) if rel[-1] == "__init__" else ".".join((pkg, *rel))
            out[name] = f
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every project module that `path` imports anywhere (top level or inside a function)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the longest known module the import names (`from qat import moe` names qat.moe)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {n: _imports(p, n, set(mods)) for n, p in mods.items()}
    # A package's __init__ re-exports its submodules; importing a submodule runs the package first,
    # which is not an edge of ours. Drop edges from a submodule to its own package.
    return {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}


def test_no_import_cycle():
    graph = import_graph()
    # the library and eval/ (the package qat.eval) were found and their imports read: top-level ones,
    # one inside a function (sharded convert loads qat.checkpoint lazily), and eval/'s into qat
    assert {"qat.errors", "qat.fake_quant", "qat.layout", "qat.moe"} <= graph["qat.coverage"]
    assert "qat.checkpoint" in graph["qat.convert.sharded"]
    assert "qat.convert.experts" in graph["qat.eval.harness"]
    # and the search reports a cycle where there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_sys_path_edits():
    offenders = [str(f.relative_to(ROOT)) for d in ("qat", "recipes", "eval", "slurm") for f in (ROOT / d).rglob("*.py")
                 if "sys.path.insert" in f.read_text()]
    assert not offenders
