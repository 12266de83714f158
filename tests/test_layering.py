"""The package keeps its layers: no import cycles, and the lower folders (model, rollout, convert, tasks,
compat) never import the RL layer above them (rl/), nor model/ the rollout engines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_rspo"
BELOW_RL = {"model", "rollout", "convert", "tasks", "compat", "planning"}


def _graph() -> dict[str, set[str]]:
    mods: dict[str, set[str]] = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_rspo"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("megatron_rspo")}
        mods[name] = deps
    return {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])
    assert not cycles, cycles


def test_no_upward_imports():
    bad = [(m, d) for m, deps in _graph().items() for d in deps
           if (_folder(m) in BELOW_RL and _folder(d) == "rl") or (_folder(m) == "model" and _folder(d) == "rollout")]
    assert not bad, bad
