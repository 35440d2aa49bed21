"""Check every use the BMTrain engine makes of bmtrain against bmtrain's own source, without importing it.

bmtrain cannot be imported without CUDA (its extension links the CUDA runtime and NCCL), so a call with
a misspelt keyword or a method that a release renamed would otherwise first fail on a lent GPU machine.
This reads ``src/cpm_live/engine/bmtrain_engine.py`` and the Python files of bmtrain's sdist (the one
``tools/gpu_wheels.sh`` carries) as syntax trees and checks:

- every bmtrain name the engine reaches (``bmt.optim.OptimManager``, ``from bmtrain.store import
  allgather_objects``) exists, following bmtrain's re-exports;
- every call of one binds to its definition: positional count, keyword names, required arguments
  (a class call binds to its ``__new__`` or ``__init__``, ``super().m(...)`` in a subclass to the base's);
- calls and attribute reads on objects the engine holds, where an annotation says what they are
  (``self._manager: bmt.optim.OptimManager``, ``-> bmt.optim.OptimManager``, and locals assigned from those):
  the method or attribute exists (a method, property, class attribute, ``self.x = ...`` or
  ``setattr(obj, "x", ...)`` in the class or a bmtrain base);
- a method an engine subclass overrides still accepts every argument name bmtrain's version takes
  (bmtrain calls it: ``OptimManager.step`` calls ``optimizer.step(scale=...)``);
- the keys the engine reads from ``bmt.config`` are keys bmtrain sets.

    python tools/bmtrain_api.py .whl/bmtrain-1.0.1.tar.gz      # 0 when every use checks out, else 1

Standard library only (runs on a bare CPU machine, before anything is installed).
"""

from __future__ import annotations

import ast
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "src" / "cpm_live" / "engine" / "bmtrain_engine.py"
PACKAGE = "bmtrain"


def read_package(sdist: str | Path) -> dict[str, ast.Module]:
    """``{"bmtrain.optim.optim_manager": tree, ...}`` from the sdist's ``<name>/bmtrain/**.py``."""
    modules = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) < 3 or parts[1] != PACKAGE or not member.name.endswith(".py"):
                continue
            dotted = parts[1:-1] + ([] if parts[-1] == "__init__.py" else [parts[-1][:-3]])
            modules[".".join(dotted)] = ast.parse(tar.extractfile(member).read().decode(), member.name)
    if PACKAGE not in modules:
        raise ValueError(f"{sdist}: no {PACKAGE}/__init__.py inside; is it bmtrain's sdist?")
    return modules


@dataclass
class Found:
    """What a dotted bmtrain name resolves to: a module, a class, a function or another value."""

    path: str
    node: ast.AST | None = None
    module: str = ""


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str, problem: str) -> None:
        self.checked.append(what)
        if not ok and f"{what}: {problem}" not in self.problems:
            self.problems.append(f"{what}: {problem}")


class Package:
    """bmtrain's modules as syntax trees, with name resolution through its imports."""

    def __init__(self, modules: dict[str, ast.Module]):
        self.modules = modules

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        is_package = isinstance(self.modules.get(module), ast.Module) and any(
            m.startswith(module + ".") for m in self.modules)
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        return ".".join(base + ([node.module] if node.module else []))

    def resolve(self, dotted: str, depth: int = 0) -> Found | None:
        """The definition ``dotted`` (``bmtrain.optim.OptimManager``) names, or None."""
        if depth > 20:
            return None
        if dotted in self.modules:
            return Found(dotted, self.modules[dotted], dotted)
        module, _, name = dotted.rpartition(".")
        owner = self.resolve(module, depth + 1) if module else None
        if owner is None:
            return None
        if isinstance(owner.node, ast.ClassDef):
            member = self.class_member(owner, name)
            return Found(dotted, member, owner.module) if member is not None else None
        if not isinstance(owner.node, ast.Module):
            return None
        for node in owner.node.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
                return Found(dotted, node, owner.path)
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                if isinstance(node.value, ast.Name):  # an alias such as ``CheckpointBlock = Block``
                    return self.resolve(f"{owner.path}.{node.value.id}", depth + 1)
                return Found(dotted, node, owner.path)
        for node in ast.walk(owner.node):  # re-exports, also inside try/except
            if isinstance(node, ast.ImportFrom):
                source = self._absolute(owner.path, node)
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return self.resolve(f"{source}.{alias.name}", depth + 1)
        return None

    def bases(self, cls: Found) -> list[Found]:
        """The class and its bases that are bmtrain classes, nearest first."""
        out, todo = [], [cls]
        while todo:
            current = todo.pop(0)
            out.append(current)
            for base in current.node.bases:
                dotted = self.name_in(current.module, base)
                found = self.resolve(dotted) if dotted else None
                if found is not None and isinstance(found.node, ast.ClassDef):
                    todo.append(found)
        return out

    def name_in(self, module: str, expr: ast.expr) -> str | None:
        """The dotted bmtrain name an expression in ``module`` refers to (module-level names only)."""
        chain = attribute_chain(expr)
        if chain is None:
            return None
        head, rest = chain[0], chain[1:]
        tree = self.modules[module]
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == head:
                return ".".join([module, head, *rest])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == head:
                        return ".".join([self._absolute(module, node), alias.name, *rest])
        return None

    def class_member(self, cls: Found, name: str) -> ast.AST | None:
        """A method, class attribute or instance attribute ``name`` of ``cls`` or a bmtrain base."""
        for klass in self.bases(cls):
            for node in klass.node.body:
                if isinstance(node, ast.FunctionDef) and node.name == name:
                    return node
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                        return node
            for node in ast.walk(klass.node):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == name
                        and isinstance(node.value, ast.Name) and node.value.id == "self"):
                    return node
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                        and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                        and node.args[1].value == name):
                    return node
        return None

    def inherits_from_outside(self, cls: Found) -> bool:
        """Whether ``cls`` or a bmtrain base of it has a base outside bmtrain (``torch.optim.Optimizer``):
        a member not found in bmtrain may then come from there, which this check cannot see."""
        for klass in self.bases(cls):
            for base in klass.node.bases:
                dotted = self.name_in(klass.module, base)
                if dotted is None or self.resolve(dotted) is None:
                    if not (isinstance(base, ast.Name) and base.id == "object"):
                        return True
        return False

    def constructor(self, cls: Found) -> tuple[ast.FunctionDef | None, bool]:
        """The ``__new__`` or ``__init__`` a call of ``cls`` binds to, and whether it is ``__new__``."""
        for klass in self.bases(cls):
            for node in klass.node.body:
                if isinstance(node, ast.FunctionDef) and node.name in ("__new__", "__init__"):
                    return node, node.name == "__new__"
        return None, False

    def config_keys(self) -> set[str]:
        """Keys bmtrain stores into its ``config`` mapping (``config["x"] = ...``, or at its creation)."""
        keys = set()
        for tree in self.modules.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and \
                        isinstance(node.value, ast.Name) and node.value.id == "config" and \
                        isinstance(node.slice, ast.Constant):
                    keys.add(node.slice.value)
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "config"
                                                        for t in node.targets) and isinstance(node.value, ast.Call):
                    keys.update(k.arg for k in node.value.keywords if k.arg)
        return keys


def attribute_chain(expr: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything else."""
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    return [expr.id, *reversed(parts)]


def bind_problem(fn: ast.FunctionDef, call: ast.Call, skip_first: bool) -> str | None:
    """Why ``call`` would not bind to ``fn``'s parameters (``skip_first``: ``self``/``cls`` is bound), or None."""
    params = fn.args.posonlyargs + fn.args.args
    if skip_first:
        params = params[1:]
    names = [p.arg for p in params]
    kwonly = [p.arg for p in fn.args.kwonlyargs]
    starred = any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords)
    positional = len(call.args)
    if not starred and positional > len(names) and fn.args.vararg is None:
        return f"{positional} positional arguments, {fn.name}() takes {len(names)}"
    given = set(names[:positional])
    for kw in call.keywords:
        if kw.arg is None:
            continue
        if kw.arg in given:
            return f"{kw.arg!r} given twice"
        if kw.arg not in names + kwonly and fn.args.kwarg is None:
            return f"no parameter {kw.arg!r} (it takes {', '.join(names + kwonly) or 'none'})"
        given.add(kw.arg)
    if starred:
        return None
    defaults = len(fn.args.defaults)
    required = names[: len(names) - defaults] if defaults else names
    required += [p.arg for p, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is None]
    missing = [r for r in required if r not in given]
    return f"missing {', '.join(missing)}" if missing else None


def engine_imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted bmtrain name, from the engine's imports."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def annotation_names(expr: ast.expr | None) -> list[ast.expr]:
    """The parts of ``X | None`` / ``Optional[X]`` / ``"X"`` annotations that name a type."""
    if expr is None:
        return []
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
        return annotation_names(expr.left) + annotation_names(expr.right)
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return annotation_names(ast.parse(expr.value, mode="eval").body)
    return [expr]


class EngineChecker:
    """Walks the engine module and checks each bmtrain use against :class:`Package`."""

    def __init__(self, package: Package, tree: ast.Module):
        self.pkg = package
        self.tree = tree
        self.imports = engine_imports(tree)
        self.report = Report()
        # The engine's own classes whose bases are bmtrain classes: name -> (ClassDef, bmtrain base).
        self.subclasses: dict[str, tuple[ast.ClassDef, Found]] = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    found = self.resolve_expr(base)
                    if found is not None and isinstance(found.node, ast.ClassDef):
                        self.subclasses[node.name] = (node, found)

    def dotted(self, expr: ast.expr) -> str | None:
        chain = attribute_chain(expr)
        if chain is None or chain[0] not in self.imports:
            return None
        return ".".join([self.imports[chain[0]], *chain[1:]])

    def resolve_expr(self, expr: ast.expr) -> Found | None:
        dotted = self.dotted(expr)
        return self.pkg.resolve(dotted) if dotted else None

    def class_of_annotation(self, expr: ast.expr | None) -> Found | None:
        """The bmtrain class an annotation names (an engine subclass counts as its bmtrain base)."""
        for name in annotation_names(expr):
            if isinstance(name, ast.Name) and name.id in self.subclasses:
                return self.subclasses[name.id][1]
            found = self.resolve_expr(name)
            if found is not None and isinstance(found.node, ast.ClassDef):
                return found
        return None

    def run(self) -> Report:
        self.check_names()
        self.check_calls()
        self.check_overrides()
        self.check_typed_uses()
        self.check_inherited_uses()
        return self.report

    def check_names(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                dotted = self.dotted(node)
                if dotted and not isinstance(getattr(node, "parent", None), ast.Attribute):
                    self.report.check(self.pkg.resolve(dotted) is not None, dotted, "not defined in bmtrain")
        for dotted in self.imports.values():
            self.report.check(self.pkg.resolve(dotted) is not None, f"import {dotted}", "not defined in bmtrain")
        keys = self.pkg.config_keys()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Subscript) and self.dotted(node.value) == f"{PACKAGE}.config" and \
                    isinstance(node.slice, ast.Constant):
                self.report.check(node.slice.value in keys, f"{PACKAGE}.config[{node.slice.value!r}]",
                                  "bmtrain never sets this key")

    def check_call(self, call: ast.Call, fn: ast.AST | None, what: str, skip_first: bool) -> None:
        if not isinstance(fn, ast.FunctionDef):
            self.report.check(fn is not None, what, "not found")
            return
        problem = bind_problem(fn, call, skip_first)
        self.report.check(problem is None, what, problem or "")

    def check_calls(self) -> None:
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call):
                continue
            target = None
            if isinstance(node.func, ast.Name) and node.func.id in self.subclasses:
                cls_node, base = self.subclasses[node.func.id]
                if any(isinstance(n, ast.FunctionDef) and n.name in ("__init__", "__new__") for n in cls_node.body):
                    continue  # the engine's own constructor: its super() call is checked below
                target = base
            else:
                target = self.resolve_expr(node.func)
            if target is None:
                continue
            if isinstance(target.node, ast.ClassDef):
                fn, is_new = self.pkg.constructor(target)
                if fn is None:
                    continue  # a torch constructor: not bmtrain's to check
                self.check_call(node, fn, f"{target.path}(...)", skip_first=True)
            elif isinstance(target.node, ast.FunctionDef):
                self.check_call(node, target.node, f"{target.path}(...)", skip_first=False)
        for cls_node, base in self.subclasses.values():
            for node in ast.walk(cls_node):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name) and \
                        node.func.value.func.id == "super":
                    method = node.func.attr
                    fn = self.pkg.class_member(base, method)
                    if fn is None:
                        continue  # defined by torch, not by bmtrain
                    # super().__new__(cls, ...) passes cls itself; other methods are bound.
                    self.check_call(node, fn, f"super().{method} -> {base.path}.{method}",
                                    skip_first=method != "__new__")

    def check_overrides(self) -> None:
        for name, (cls_node, base) in self.subclasses.items():
            for node in cls_node.body:
                if not isinstance(node, ast.FunctionDef) or node.name in ("__init__", "__new__"):
                    continue
                theirs = self.pkg.class_member(base, node.name)
                if not isinstance(theirs, ast.FunctionDef):
                    continue
                ours = {a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs}
                needed = [a.arg for a in theirs.args.posonlyargs + theirs.args.args + theirs.args.kwonlyargs]
                missing = [a for a in needed if a not in ours] if node.args.kwarg is None else []
                self.report.check(not missing, f"{name}.{node.name} overrides {base.path}.{node.name}",
                                  f"bmtrain's takes {', '.join(missing)}, the override does not")

    def check_typed_uses(self) -> None:
        """Attribute reads and method calls on ``self.<attr>`` and locals whose annotation is a bmtrain class."""
        attr_types: dict[str, Found] = {}
        returns: dict[str, Found] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute) and \
                    isinstance(node.target.value, ast.Name) and node.target.value.id == "self":
                found = self.class_of_annotation(node.annotation)
                if found is not None:
                    attr_types[node.target.attr] = found
            if isinstance(node, ast.FunctionDef):
                found = self.class_of_annotation(node.returns)
                if found is not None:
                    returns[node.name] = found
        for fn in ast.walk(self.tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            local_types: dict[str, Found] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                        and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute) \
                        and node.value.func.attr in returns:
                    local_types[node.targets[0].id] = returns[node.value.func.attr]
            for node in ast.walk(fn):
                if not isinstance(node, ast.Attribute):
                    continue
                owner = None
                value = node.value
                if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and \
                        value.value.id == "self" and value.attr in attr_types:
                    owner = attr_types[value.attr]
                elif isinstance(value, ast.Name) and value.id in local_types:
                    owner = local_types[value.id]
                elif isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and \
                        value.func.attr in returns:
                    owner = returns[value.func.attr]
                if owner is None:
                    continue
                self.check_member(owner, node.attr)
        for fn in ast.walk(self.tree):
            for node in ast.walk(fn) if isinstance(fn, ast.FunctionDef) else []:
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = self._typed_owner(node.func.value, attr_types, returns, fn)
                    if owner is not None:
                        member = self.pkg.class_member(owner, node.func.attr)
                        if isinstance(member, ast.FunctionDef):
                            self.check_call(node, member, f"{owner.path}.{node.func.attr}(...)", skip_first=True)

    def check_member(self, owner: Found, name: str) -> None:
        member = self.pkg.class_member(owner, name)
        if member is None and self.pkg.inherits_from_outside(owner):
            return  # e.g. torch.optim.Optimizer's param_groups: not bmtrain's to check
        self.report.check(member is not None, f"{owner.path}.{name}", "no such method or attribute")

    def check_inherited_uses(self) -> None:
        """``self.x`` in an engine subclass that the subclass does not define: bmtrain's base must."""
        for cls_node, base in self.subclasses.values():
            own = {n.name for n in cls_node.body if isinstance(n, ast.FunctionDef)}
            for node in ast.walk(cls_node):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                        isinstance(node.value, ast.Name) and node.value.id == "self":
                    own.add(node.attr)
            for node in ast.walk(cls_node):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and \
                        isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr not in own:
                    self.check_member(base, node.attr)

    def _typed_owner(self, value: ast.expr, attr_types, returns, fn: ast.FunctionDef) -> Found | None:
        if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "self":
            return attr_types.get(value.attr)
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
            return returns.get(value.func.attr)
        if isinstance(value, ast.Name):
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                        isinstance(node.targets[0], ast.Name) and node.targets[0].id == value.id and \
                        isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute):
                    return returns.get(node.value.func.attr)
        return None


def check(sdist: str | Path, engine: str | Path = ENGINE) -> Report:
    """Every bmtrain use in ``engine`` checked against the bmtrain source in ``sdist``."""
    tree = ast.parse(Path(engine).read_text(), str(engine))
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child.parent = parent
    return EngineChecker(Package(read_package(sdist)), tree).run()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        report = check(*args)
    except (OSError, tarfile.TarError, ValueError, SyntaxError) as e:
        print(f"error: {e}")
        return 1
    unique = sorted(set(report.checked))
    engine = Path(args[1]) if len(args) > 1 else ENGINE.relative_to(REPO)
    print(f"bmtrain API: {len(unique)} uses of bmtrain in {engine} checked against {Path(args[0]).name}")
    for what in unique:
        print(f"  ok  {what}" if not any(p.startswith(what + ":") for p in report.problems) else f"  BAD {what}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
