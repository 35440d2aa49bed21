"""The package's floors, drawn from its own imports: every import runs down a floor, none in a circle.

Every ``import``/``from ... import`` in ``src/cpm_live`` counts, including imports inside functions and
under ``if TYPE_CHECKING:``; docs/architecture.md shows the same picture.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from tests.conftest import REPO

SRC = REPO / "src" / "cpm_live"

# Old import paths kept for CPM-Bee users' scripts: re-exports only, on the top floor.
COMPATIBILITY = ["delta", "dataset", "training_tasks", "model_dir"]
# Bottom to top. A package may import its own modules and the packages on lower floors, never one
# on its own floor or above.
FLOORS: list[list[str]] = [
    ["utils", "errors"],
    ["config", "quant", "tokenizers", "outputs"],
    ["layers", "data"],
    ["models", "engine", "evaluation"],
    ["lora"],
    ["checkpoint"],
    ["convert", "generation"],
    ["training"],
    ["demo"],
    COMPATIBILITY,
]
FLOOR = {pkg: i for i, pkgs in enumerate(FLOORS) for pkg in pkgs}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(module: str) -> set[str]:
    """Every cpm_live module ``module`` imports (``from pkg import submodule`` counts as the submodule)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_package_has_a_floor():
    assert {_package(m) for m in MODULES} - {""} == set(FLOOR), "add new packages to FLOORS and the docs"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if "." in m))
def test_imports_run_down_a_floor(module):
    here = _package(module)
    upward = sorted(t for t in GRAPH[module] if _package(t) != here and FLOOR[_package(t)] >= FLOOR[here])
    assert not upward, f"{module} (floor {FLOOR[here]}) imports {upward} on its floor or above"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _package(m) in COMPATIBILITY))
def test_compatibility_paths_only_re_export(module):
    """The old import paths hold no code, and nothing in the package goes through them."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    code = [type(n).__name__ for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign))
            and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert not code, f"{module} defines {code}: a compatibility path only re-exports"
    assert "compatibility" in (ast.get_docstring(tree) or "").lower(), f"{module}: say why the path is kept"
    users = sorted(m for m, targets in GRAPH.items() if module in targets and _package(m) not in COMPATIBILITY)
    assert not users, f"{users} import {module}; import from the package it re-exports instead"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
