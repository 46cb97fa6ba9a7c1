"""The import graph of ddpm_fast, ddpm_fast.kernels and ddpm_fast.export: no private name used
across modules, no import cycle.

Every module of ddpm_fast/, kernels/ and export/ is parsed (kernels/ and export/ install as
ddpm_fast.kernels and ddpm_fast.export) and every import collected, at module level and inside
functions alike: a cycle broken by a function-level import is still a cycle.

Private names. ``from X import _name`` and ``X._name`` (X one of these modules, bound by an
import) fail in any module but X itself; dunders (``__version__``) are public. A private module
(``kernels/_launch.py``) is private to its package: modules of that package may import it (and
its public names), modules outside may not. A name a module needs from another is public there.

Cycles. An edge A -> B is an import of B written in A, outside ``if TYPE_CHECKING:`` (never
run); ``from P import name`` is an edge to the submodule ``P.name`` where there is one, else to P.
Importing P.sub runs P's ``__init__`` first, so an import of P.sub is an edge to P too, and P's
own imports follow from there: a package's ``__init__`` that re-exports from its submodules is
part of the path, as it is at import time. What an ``__init__`` exposes lazily (PEP 562
``__getattr__``, ``importlib``) is no static import and no edge. A module's import of one of its
own ancestor packages (``from .. import load``) is no edge either: that ``__init__`` is already
being imported whenever the module is. Every strongly connected set of modules larger than one
fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"ddpm_fast": "ddpm_fast", "kernels": "ddpm_fast.kernels", "export": "ddpm_fast.export"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three folders."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = module_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The module a ``from ... import`` names, its relative dots resolved."""
    if not node.level:
        return node.module
    package = module if is_package(module) else module.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def scan(module: str, source: str | None = None) -> tuple[set[str], list[str]]:
    """(the modules ``module`` imports, outside TYPE_CHECKING; the private names it uses of other
    modules, as "target._name"), from its file or from ``source``."""
    if source is None:
        source = MODULES[module].read_text()
    tree = ast.parse(source)
    skipped = type_checking_nodes(tree)
    edges, private, bound = set(), [], {}  # bound: local name -> the module it is bound to

    def use(target: str, name: str | None = None) -> None:
        """``module`` imports ``target`` (a module of ours) or its attribute ``name``."""
        if target == module:
            return
        parent, _, last = target.rpartition(".")
        if is_private(last) and not (module == parent or module.startswith(parent + ".")):
            private.append(target)  # a private module, used outside its package
        if name is not None and is_private(name):
            private.append(f"{target}.{name}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    use(alias.name)
                    if id(node) not in skipped:
                        edges.add(alias.name)
                    if alias.asname:
                        bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, node)
            if source not in MODULES:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    use(sub)
                    target = sub
                    bound[alias.asname or alias.name] = sub
                else:
                    use(source, alias.name)
                    target = source
                if id(node) not in skipped:
                    edges.add(target)
    for node in ast.walk(tree):  # X._name where X is bound to one of our modules
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            dotted = ast.unparse(node.value)
            target = bound.get(dotted, dotted)
            if target in MODULES and target != module:
                private.append(f"{target}.{node.attr}")
    edges |= {parent for target in edges for parent in ancestors(target)}  # their __init__s run
    edges -= {module, *ancestors(module)}
    return edges, private


GRAPH, PRIVATE = {}, {}
for _name in MODULES:
    GRAPH[_name], PRIVATE[_name] = scan(_name)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_folders_are_all_found():
    assert {"ddpm_fast.noise", "ddpm_fast.kernels", "ddpm_fast.export.philox"} <= set(MODULES)
    assert len(MODULES) > 50


def test_no_private_name_is_used_across_modules():
    found = sorted((module, used) for module, used_names in PRIVATE.items() for used in used_names)
    assert found == [], "make these names public where they are defined:\n" + "\n".join(
        f"{MODULES[m].relative_to(ROOT)} uses {u}" for m, u in found
    )


def test_there_is_no_import_cycle():
    found = cycles(GRAPH)
    lines = []
    for members in found:
        inside = [f"{a} -> {b}" for a in members for b in sorted(GRAPH[a]) if b in members]
        lines.append("; ".join(inside))
    assert found == [], "import cycles (their edges):\n" + "\n".join(lines)


def test_the_checks_find_what_they_are_for():
    """The rules on made-up code: what each must find, and what it must let pass."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    edges, private = scan(
        "ddpm_fast.diffusers_folder", "def f():\n    from .checkpoints import _read_torch\n"
    )
    assert "ddpm_fast.checkpoints" in edges and private == ["ddpm_fast.checkpoints._read_torch"]
    _, private = scan("ddpm_fast.cli", "from .export import verify as v\nv._first_line(e)\n")
    assert private == ["ddpm_fast.export.verify._first_line"]
    _, private = scan(
        "ddpm_fast.cli", "import ddpm_fast.export.verify\nddpm_fast.export.verify._x\n"
    )
    assert private == ["ddpm_fast.export.verify._x"]
    launch = "from ..kernels._launch import HAS_TRITON\n"
    assert scan("ddpm_fast.engine.engine", launch)[1] == ["ddpm_fast.kernels._launch"]
    assert scan("ddpm_fast.kernels.group_norm", "from ._launch import HAS_TRITON\n")[1] == []
    edges, private = scan("ddpm_fast.export.verify", "from .. import load, __version__\n")
    assert edges == set() and private == []  # its own ancestor; a dunder
    edges, _ = scan(
        "ddpm_fast.cli",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from .pipeline import Pipeline\nfrom .export.philox import x\n",
    )
    assert edges == {"ddpm_fast.export.philox", "ddpm_fast.export"}  # and export's __init__
