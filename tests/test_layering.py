"""The package's import graph: no cycles, and the layers point down.

Checked statically: every module under tailkd_dist/ is parsed (ast) and every import it makes,
at module level or inside a function, becomes an edge to the tailkd_dist module it names
(``from a.b import c`` counts as a.b, or a.b.c when that is a module). A cycle through a
function-local import is still a cycle (it only hides until the function runs)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tailkd_dist"

LAYERS = {  # a layer may import only itself and layers with a lower number
    "tailkd_dist.parallel": 0,
    "tailkd_dist.losses": 1,
}


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def test_no_import_cycle():
    mods = modules()
    graph = edges(mods)
    assert graph["tailkd_dist.metrics"] and graph["tailkd_dist.train"], "the parser found no edges"
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            # a package's __init__ importing its own submodules is not a cycle of concern
            if n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_point_down():
    graph = edges(modules())

    def layer(m):
        for prefix, n in LAYERS.items():
            if m == prefix or m.startswith(prefix + "."):
                return prefix, n
        return None, None

    bad = []
    for m, targets in graph.items():
        pm, lm = layer(m)
        if lm is None:
            continue
        for t in targets:
            pt, lt = layer(t)
            if pt is None and t != "tailkd_dist":
                bad.append(f"{m} -> {t} (outside the lower layers)")
            elif lt is not None and lt > lm:
                bad.append(f"{m} -> {t}")
    assert not bad, "imports pointing up: " + "; ".join(bad)
