"""The shape of the package, checked: no import circle (imports inside functions count), imports point
down the layers, tso.method stays free of Ray and of everything above it, and one module talks to Serve."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tso"

# Lower numbers are lower layers; a module may import its own layer and any lower one.
LAYERS = {
    "tso.io": 0, "tso.config": 0, "tso.method": 0,
    "tso.models": 1, "tso.toyworld": 1,
    "tso.engines": 2,
    "tso.zoo": 3, "tso.cluster": 3,
    "tso.serving": 4, "tso.train": 4,
    "tso.pairs": 5,
    "tso.run": 6,
    "tso.commands": 7, "tso.cli": 7,
}
COMMAND_LAYER = 7  # every area's commands.py is a door for the CLI: it sits with tso.cli


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(tso modules, other top-level packages) imported anywhere in a file, function bodies included."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            if not name.startswith("tso"):
                others.add(name.split(".")[0])
                continue
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            ours.add(name)
    return ours, others


def layer(module: str) -> int:
    if module.endswith(".commands"):
        return COMMAND_LAYER
    return max(v for k, v in LAYERS.items() if module == k or module.startswith(k + "."))


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = modules()
    ours, others = {}, {}
    for name, path in known.items():
        ours[name], others[name] = imports(path, known)
        ours[name].discard(name)
    return ours, others


def test_no_import_circle():
    edges, _ = graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle.extend(path[path.index(n):] + [m, n] if n in path else [m, n])
                return True
            if state.get(n) is None and visit(n, [*path, m]):
                return True
        state[m] = 2
        return False

    assert not any(visit(m, []) for m in sorted(edges) if state.get(m) is None), " -> ".join(cycle)


def test_imports_point_down_the_layers():
    edges, _ = graph()
    up = sorted(f"{m} -> {n}" for m, ns in edges.items() for n in ns if layer(n) > layer(m))
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)


def test_method_imports_neither_ray_nor_anything_above_it():
    edges, others = graph()
    for m in (m for m in edges if m.startswith("tso.method")):
        assert edges[m] <= {n for n in edges if n.startswith("tso.method")} | {"tso.config"}, m
        assert not others[m] & {"ray", "fastapi", "deepspeed", "vllm", "transformers"}, (m, others[m])


def test_only_the_client_fetches_serve_handles():
    callers = {name for name, path in modules().items() if "get_deployment_handle" in path.read_text()}
    assert callers == {"tso.serving.client"}, callers
