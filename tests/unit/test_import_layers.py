"""Imports run one way (docs/architecture.md): no cycle, and no layer imports one above it.

Every ``import bitrain...`` counts, at module level or inside a function (a function-local import
must not be a way around a cycle). Importing ``a.b.c`` also runs ``a.b``'s ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "bitrain").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.startswith("bitrain") else ""
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the packages on the way run their __init__
                package = ".".join(parts[:i])
                if (
                    package in MODULES
                    and package != module
                    and not module.startswith(package + ".")
                ):
                    found.add(package)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_no_import_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

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
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


# layer -> the bitrain packages it may import (besides itself): docs/architecture.md's picture
_BASE = {"bitrain.io"}
_PARTS = _BASE | {"bitrain.models", "bitrain.data", "bitrain.tokenizers"}
_TASKS = _PARTS | {"bitrain.checkpoints", "bitrain.tasks"}
_RUNS = _TASKS | {"bitrain.callbacks", "bitrain.training"}
ALLOWED = {
    "bitrain.io": set(),
    "bitrain.models": _BASE,
    "bitrain.data": _BASE,
    "bitrain.tokenizers": _BASE,
    "bitrain.checkpoints": {"bitrain.io", "bitrain.models", "bitrain.data"},
    "bitrain.tasks": _TASKS,
    "bitrain.callbacks": _TASKS,
    "bitrain.training": _TASKS | {"bitrain.callbacks"},
    "bitrain.evaluation": _RUNS,
    "bitrain.tools": _RUNS | {"bitrain.evaluation"},
}
ENTRY_POINTS = {
    "pretrain",
    "finetune",
    "train_tokenizer",
    "evaluate",
    "predict",
    "demo",
    "doctor",
    "report",
}


def test_top_level_is_entry_points_and_packages():
    """``bitrain/`` holds the commands (thin modules with ``main``) and the role packages only."""
    top = sorted(p.stem for p in (ROOT / "bitrain").glob("*.py") if p.stem != "__init__")
    assert set(top) == ENTRY_POINTS, f"top-level modules that are not entry points: {top}"
    packages = {p.name for p in (ROOT / "bitrain").iterdir() if (p / "__init__.py").is_file()}
    assert packages == {layer.split(".")[1] for layer in ALLOWED}, packages
    for name in top:
        source = (ROOT / "bitrain" / f"{name}.py").read_text()
        tree = ast.parse(source)
        defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert defs in ([], ["main"]), (
            f"bitrain/{name}.py defines {defs}: logic belongs in a package"
        )
        assert len(source.splitlines()) <= 50, f"bitrain/{name}.py is not thin"


def test_nothing_imports_an_entry_point():
    importers = {
        module: sorted(t for t in targets if t.removeprefix("bitrain.") in ENTRY_POINTS)
        for module, targets in GRAPH.items()
    }
    assert not any(importers.values()), {m: ts for m, ts in importers.items() if ts}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_below_themselves(layer):
    allowed = (layer, *ALLOWED[layer])
    wrong = {
        module: sorted(
            t
            for t in targets
            if t != "bitrain" and not any(t == a or t.startswith(a + ".") for a in allowed)
        )
        for module, targets in GRAPH.items()
        if module == layer or module.startswith(layer + ".")
    }
    assert not any(wrong.values()), {m: ts for m, ts in wrong.items() if ts}
