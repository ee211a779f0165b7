"""gptdist's packages import one way: each layer may import the layers below it, never one above, and no two
packages import each other (directly or around a longer loop). Read from the source with ast, so the test sees
imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[2] / "gptdist"

# Lowest first. A module at the top of gptdist/ (config.py, cli.py) counts as a package of its own.
LAYERS: List[Tuple[str, ...]] = [
    ("errors", "machine"),
    ("model",),
    ("data",),
    ("config",),
    ("parallel",),
    ("engine",),
    ("launchers",),
    ("telemetry",),
    ("checkpoint",),
    ("train",),
    ("plan", "tools"),
    ("bench",),
    ("commands",),
    ("cli", "__init__"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def package_of(module: str) -> str:
    """'gptdist.train.loop' -> 'train'; 'gptdist.config' -> 'config'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[Tuple[str, int]]:
    """(imported gptdist module, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gptdist"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("gptdist"):
                yield target, node.lineno


def package_graph() -> Dict[Tuple[str, str], List[str]]:
    """(importing package, imported package) -> where ('file:line'), over every module of gptdist."""
    edges: Dict[Tuple[str, str], List[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = package_of(module_name(path))
        for target, line in imports_of(path):
            dest = package_of(target)
            if dest != source:
                edges.setdefault((source, dest), []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges


def upward(edges: Dict[Tuple[str, str], List[str]]) -> List[str]:
    out = []
    for (src, dst), where in sorted(edges.items()):
        if src not in LAYER_OF or dst not in LAYER_OF:
            out.append(f"{src} -> {dst}: a package missing from LAYERS ({where[0]})")
        elif LAYER_OF[dst] > LAYER_OF[src]:
            out.append(f"{src} (layer {LAYER_OF[src]}) imports {dst} (layer {LAYER_OF[dst]}) at {', '.join(where)}")
    return out


def cycles(edges: Dict[Tuple[str, str], List[str]]) -> List[List[str]]:
    """Strongly connected groups of two or more packages (Tarjan)."""
    graph: Dict[str, Set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_package_has_a_layer():
    packages = {package_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert packages - set(LAYER_OF) == set()


def test_imports_flow_down_the_layers():
    assert upward(package_graph()) == []


def test_no_import_cycle_between_packages():
    assert cycles(package_graph()) == []


def test_checkpoint_never_imports_train():
    assert ("checkpoint", "train") not in package_graph()


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checker itself: an added upward import (checkpoint -> train) and the loop it closes are both found."""
    edges = dict(package_graph())
    edges[("checkpoint", "train")] = ["gptdist/checkpoint/planted.py:1"]
    found = upward(edges)
    assert any(line.startswith("checkpoint (layer") and "imports train" in line and "planted.py:1" in line
               for line in found), found
    assert any({"checkpoint", "train"} <= set(group) for group in cycles(edges))
    assert any("nowhere -> model" in line for line in upward({("nowhere", "model"): ["x.py:1"]}))
