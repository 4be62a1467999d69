"""The house stays as drawn: arrows point down, no import circle, the server composes Flower.

Read from the source with the standard library's ``ast`` (every ``import``, also inside
functions), so a lazy import cannot hide a circle or a wrong arrow.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedal", "clients", "server", "simulations")
#: what each folder may import from the project (arrows point down; deploy/ scripts sit on top)
ALLOWED = {
    "fedal": {"fedal"},
    "clients": {"fedal", "clients"},
    "server": {"fedal", "server"},
    "simulations": {"fedal", "clients", "server", "simulations"},
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Project modules that the module ``name`` (file ``path``) imports, wherever the import sits."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from pkg import name` the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import fedal.strategies.base as x` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_of_the_project_is_part_of_an_import_circle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():  # the test above can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_arrows_point_down():
    wrong = []
    for name, targets in graph().items():
        top = name.split(".")[0]
        for target in targets:
            if target.split(".")[0] not in ALLOWED[top]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_the_core_imports_no_flower_outside_its_flower_corner():
    offenders = []
    for name, path in modules().items():
        if not name.startswith("fedal") or name.startswith("fedal.flower"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("flwr", "ray", "argparse")]
    assert offenders == []  # argparse too: flags live above the library


def _server_trees():
    for path in sorted((REPO / "server").glob("*.py")):
        yield path, ast.parse(path.read_text())


def test_no_class_is_made_at_run_time_and_nothing_is_forwarded_or_probed():
    found = []
    for path, tree in _server_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "type" and len(node.args) == 3:
                    found.append(f"{path.name}:{node.lineno}: type(name, bases, dict)")
                if node.func.id in ("hasattr", "getattr") and path.parent.name == "server":
                    found.append(f"{path.name}:{node.lineno}: {node.func.id}()")
            if isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__setattr__"):
                found.append(f"{path.name}:{node.lineno}: {node.name}")
    assert found == []


def test_the_server_reads_no_private_attribute_of_another_object():
    reads = []
    for path, tree in _server_trees():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                reads.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert reads == []


@pytest.mark.parametrize("source, expected", [
    ("import clients.site\n", {"clients.site"}),
    ("from clients import site\n", {"clients.site"}),
    ("def f():\n    from server.book import RoundBook\n", {"server.book"}),
    ("from fedal.strategies.base import QueryContext\n", {"fedal.strategies.base"}),
])
def test_imports_are_read_also_inside_functions(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imports(path, "simulations.probe", modules()) == expected
