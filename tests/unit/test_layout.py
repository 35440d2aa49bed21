"""Where things live: one ``torch.load`` in the package, and one base for every error it raises."""

import ast
import importlib
import inspect
import pathlib
import pkgutil

import cpm_live
from cpm_live.errors import CPMLiveError

SRC = pathlib.Path(cpm_live.__file__).parent


def test_every_pt_read_goes_through_safe_torch_load():
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert len(calls) == 1 and calls[0].startswith("checkpoint/safe_load.py:"), calls


def test_every_error_class_derives_from_cpm_live_error():
    names = [m.name for m in pkgutil.walk_packages(cpm_live.__path__, "cpm_live.")
             if not m.name.endswith("__main__") and m.name != "cpm_live.engine.bmtrain_engine"]
    outside = set()
    for name in names:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            ours = inspect.isclass(cls) and cls.__module__.startswith("cpm_live")
            if ours and issubclass(cls, Exception) and not issubclass(cls, (Warning, CPMLiveError)):
                outside.add(f"{cls.__module__}.{cls.__qualname__}")
    assert not outside, f"derive these from cpm_live.errors.CPMLiveError: {sorted(outside)}"
