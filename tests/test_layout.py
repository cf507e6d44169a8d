"""The layering of the package: core at the bottom, libraries, stages, interfaces on top.

Imports are read from the source (at every depth, so an import inside a function counts)
and every module is also imported for real.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import pipeline

PKG = Path(pipeline.__file__).resolve().parent
LIBRARIES = ("sources", "filters", "dedup", "tokenize", "model", "training", "evaluation")
REPO = PKG.parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Modules of this repository that the file imports (`from pkg import module` resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in ("pipeline", "flows"):
                while n not in MODULES and "." in n and not n.startswith("flows"):
                    n = n.rsplit(".", 1)[0]
                found.add(n)
    return found


GRAPH = {m: {i for i in _imports(p) if i != m} for m, p in MODULES.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "top"
    if parts[1] == "stages":
        return "registry" if module == "pipeline.stages.registry" or len(parts) == 2 else "stage"
    if parts[1] in LIBRARIES:
        return "library"
    return parts[1]  # core, apps


ALLOWED = {
    "core": {"core", "top"},
    "registry": {"core", "top", "registry"},
    "library": {"core", "top", "library"},
    "stage": {"core", "top", "library", "registry"},
    "apps": {"core", "top", "library", "registry", "stage", "apps"},
    "top": {"top", "apps", "core"},
}


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")
                                        if m.name != "pipeline.__main__"))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_layers():
    bad = []
    for m, deps in GRAPH.items():
        for d in deps:
            if d.startswith("flows"):
                bad.append(f"{m} imports {d}: the library never imports the orchestrator")
            elif layer(d) not in ALLOWED[layer(m)]:
                bad.append(f"{m} ({layer(m)}) imports {d} ({layer(d)})")
    assert not bad, "\n".join(sorted(bad))


def test_stages_do_not_import_each_other():
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if layer(m) == "stage"
           for d in deps if layer(d) == "stage"]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in MODULES:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [])
    # a package importing its own submodule and back is a cycle too, except the package
    # face re-exporting (which the rule below forbids anyway)
    assert not cycles, "\n".join(cycles)


def test_package_inits_only_re_export():
    for m, p in MODULES.items():
        if p.name != "__init__.py":
            continue
        tree = ast.parse(p.read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        logic = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign))]
        assert not logic, f"{p.relative_to(REPO)} holds logic ({type(logic[0]).__name__} at line {logic[0].lineno})"


def test_flows_hold_no_logic():
    for p in (REPO / "flows").glob("*.py"):
        tree = ast.parse(p.read_text())
        defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{p.relative_to(REPO)} defines {defs}: the flow lives in pipeline/apps/flow.py"
