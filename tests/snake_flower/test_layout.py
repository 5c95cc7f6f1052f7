"""The package layout: imports run one way, with no cycle, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Top to bottom: a module may import its own layer and the layers below it, never above.
LAYERS = ["cli", "harness", "simulation", "deploy", "apps", "runtime", "config", "training", "tasks", "segments"]
APPS = {"server_app", "client_app", "split_client", "node", "node_settings", "node_store", "node_model", "node_copy"}


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str, is_package: bool) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports too)."""
    out = set()
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join(parent + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: {m for m in _imports(path, name, path.name == "__init__.py") if m in modules and m != name}
            for name, path in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package face (__init__) re-exports, it is no layer
    return "apps" if parts[1] in APPS else parts[1]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_inside_snake_flower():
    graph = _graph("snake_flower")
    assert len(graph) > 20, "the AST walk found too few modules to mean anything"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_run_down_the_layers():
    upward = []
    for module, imported in _graph("snake_flower").items():
        here = _layer(module)
        for target in imported:
            there = _layer(target)
            if here and there and LAYERS.index(there) < LAYERS.index(here):
                upward.append(f"{module} -> {target}")
    assert not upward, f"imports that run up the layers {LAYERS}: {upward}"
    assert {_layer(m) for m in _graph("snake_flower")} - {None} <= set(LAYERS)


def test_strategies_never_import_the_app():
    for name, path in _modules("strategies").items():
        imported = _imports(path, name, path.name == "__init__.py")
        assert not any(m == "snake_flower" or m.startswith("snake_flower.") for m in imported), name
