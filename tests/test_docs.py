"""Docs do not drift (after baal's ``tests/documentation_test.py``).

Every public module, class, function and method in ``fedal`` has a docstring, and every
parameter of a public function or method is named in its docstring (a method may inherit
the docstring of the method it overrides); ``__init__`` parameters may be documented in
the class docstring instead. Private names (leading underscore), ``self``/``cls`` and
``*args``/``**kwargs`` are exempt. One test per module, so a failure points at the file.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import fedal


def public_modules() -> list[str]:
    names = ["fedal"]
    for info in pkgutil.walk_packages(fedal.__path__, "fedal."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def public_members(module):
    """``(qualified name, object, owning class or None, docstring)`` defined in ``module``."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj, None, inspect.getdoc(obj)
        elif inspect.isclass(obj):
            yield name, obj, None, inspect.getdoc(obj) if obj.__doc__ else None
            for attr_name, attr in vars(obj).items():
                if attr_name.startswith("_") and attr_name != "__init__":
                    continue
                qual = f"{name}.{attr_name}"
                if isinstance(attr, property):
                    yield qual, attr.fget, obj, inspect.getdoc(attr)
                    continue
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if not inspect.isfunction(attr):
                    continue
                if attr_name == "__init__":
                    own = inspect.getdoc(attr) if attr.__doc__ else ""
                    yield qual, attr, obj, f"{own}\n{inspect.getdoc(obj) or ''}"
                else:  # getattr: inspect.getdoc then finds the docstring of an overridden method
                    yield qual, attr, obj, inspect.getdoc(getattr(obj, attr_name))


def undocumented_parameters(func, doc: str) -> list[str]:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins have no signature
        return []
    return [
        p.name for p in params
        if p.name not in ("self", "cls") and not p.name.startswith("_")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and not re.search(rf"\b{re.escape(p.name)}\b", doc)
    ]


def doc_problems(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    problems = [] if (module.__doc__ or "").strip() else [f"{module_name}: module has no docstring"]
    for qual, obj, _owner, doc in public_members(module):
        if not (doc or "").strip():
            problems.append(f"{module_name}.{qual}: no docstring")
            continue
        missing = [] if inspect.isclass(obj) else undocumented_parameters(obj, doc)  # classes: via __init__
        if missing:
            problems.append(f"{module_name}.{qual}: parameters {missing} not named in the docstring")
    return problems


@pytest.mark.parametrize("module_name", public_modules())
def test_public_api_is_documented(module_name):
    problems = doc_problems(module_name)
    assert not problems, "document these (numpydoc 'Parameters' section or inline):\n" + "\n".join(problems)


# --- the checker itself must be able to fail ------------------------------------------
def _documented(alpha, beta=1):
    """Uses ``alpha`` and beta."""


def _undocumented(alpha, gamma):
    """Mentions alpha only."""


def test_checker_spots_an_undocumented_parameter():
    assert undocumented_parameters(_documented, inspect.getdoc(_documented)) == []
    assert undocumented_parameters(_undocumented, inspect.getdoc(_undocumented)) == ["gamma"]
    assert "fedal.pool" in public_modules() and "fedal.strategies.base" in public_modules()


def test_checker_walks_methods_and_init():
    from fedal import pool

    names = {qual for qual, *_ in public_members(pool)}
    assert {"Pool", "Pool.__init__", "Pool.answer", "Pool.ids"} <= names
    assert not any(name.split(".")[-1].startswith("_") and not name.endswith("__init__") for name in names)
