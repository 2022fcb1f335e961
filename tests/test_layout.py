"""The package's layering contract, measured from the source with ``ast`` (nothing is imported).

The import graph has one node per module under ``cbd_fast/`` and one edge per import of another
``cbd_fast`` module, wherever the import statement is: at the top, inside a function, under
``TYPE_CHECKING``, in a ``try``; ``importlib.import_module("cbd_fast....")`` with a string literal
counts too. ``from cbd_fast.x import y`` is an edge to ``cbd_fast.x.y`` when that is a module, else
to ``cbd_fast.x``. Importing a submodule is not counted as importing its parent packages.

The contract:

- no import cycle between modules;
- layers: ``cbd_fast.ops`` and ``cbd_fast.kernels`` import nothing from ``core``/``evaluation``/``app``;
  ``cbd_fast.core`` nothing from ``evaluation``/``app``; ``cbd_fast.evaluation`` nothing from ``app``;
- at most ``MAX_FLAT_MODULES`` ``*.py`` files directly in ``cbd_fast/``;
- at most ``MAX_FLOORS`` import floors over "rooms" (a subpackage directory with everything under it,
  or one flat module): floor(room) = 1 + the highest floor among the rooms it imports, 1 when it
  imports none;
- running ``cbd_fast.purify`` loads nothing from ``cbd_fast.evaluation`` or ``cbd_fast.app``.
"""

from __future__ import annotations

import ast
import importlib.machinery
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "cbd_fast"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_FLAT_MODULES = 10
MAX_FLOORS = 9

#: room -> rooms it must not import (direct imports).
FORBIDDEN = {
    "ops": ("core", "evaluation", "app"),
    "kernels": ("core", "evaluation", "app"),
    "core": ("evaluation", "app"),
    "evaluation": ("app",),
}

#: (importing module, imported module) -> line numbers of the import statements.
Edges = dict[tuple[str, str], list[int]]


# ---- the graph ---------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    """``cbd_fast/core/attack.py`` -> ``cbd_fast.core.attack``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _extension_name(path: Path) -> str | None:
    """The module name of a compiled extension file (``_C.cpython-311-...so`` -> ``cbd_fast._C``) or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if path.name.endswith(suffix):
            rel = path.relative_to(ROOT.parent)
            return ".".join((*rel.parts[:-1], path.name[: -len(suffix)]))
    return None


def source_modules() -> dict[str, Path]:
    """Every ``*.py`` module under ``cbd_fast/``: ``{dotted name: path}``."""
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def known_modules() -> set[str]:
    """The source modules plus compiled extension modules (leaves of the graph)."""
    extensions = {_extension_name(p) for p in ROOT.rglob("*") if p.is_file()}
    return set(source_modules()) | {name for name in extensions if name}


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <node.module> import ...`` inside ``module`` (relative or not)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _import_module_literal(node: ast.Call) -> str | None:
    """The literal ``X`` of ``importlib.import_module("X")``, ``import_module("X")``, ``__import__("X")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def imports_of(source: str, module: str, *, is_package: bool, known: set[str]) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import anywhere in ``source``, the code of ``module``.

    Every package is reported (``torch`` too); ``from a.b import c`` gives ``a.b.c`` when that is in
    ``known``, else ``a.b``; relative imports are resolved against ``module``.
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, is_package, node)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else base), node.lineno
        elif isinstance(node, ast.Call):
            literal = _import_module_literal(node)
            if literal is not None:
                yield literal, node.lineno


def import_graph() -> Edges:
    """Every import edge between two different ``cbd_fast`` modules, with its line numbers."""
    known = known_modules()
    edges: Edges = {}
    for module, path in source_modules().items():
        found = imports_of(path.read_text(), module, is_package=path.name == "__init__.py", known=known)
        for target, line in found:
            if not _in_package(target) or target == module:
                continue
            lines = edges.setdefault((module, target), [])
            if line not in lines:
                lines.append(line)
    return edges


def _adjacency(edges: Edges | set[tuple[str, str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node (each sorted)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle ``[a, b, ..., a]`` through the first node of a strongly connected component."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {component}")  # pragma: no cover


# ---- rooms and floors ------------------------------------------------------------------------------------


def room_of(module: str) -> str:
    """``cbd_fast.core.adversaries.x`` -> ``core`` (a subpackage directory); ``cbd_fast.info`` -> ``info``;
    ``cbd_fast`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def room_graph(edges: Edges) -> dict[str, set[str]]:
    """Rooms and the other rooms they import; every room appears, importing nothing or not."""
    graph = {room_of(m): set() for m in known_modules()}
    for src, dst in edges:
        if room_of(src) != room_of(dst):
            graph[room_of(src)].add(room_of(dst))
    return graph


def condensed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with each set of rooms that import each other merged into one node ``"a+b"``."""
    merged = {room: "+".join(c) for c in strongly_connected(graph) for room in c}
    out: dict[str, set[str]] = {}
    for room, deps in graph.items():
        node = merged.get(room, room)
        out.setdefault(node, set()).update(merged.get(d, d) for d in deps if merged.get(d, d) != node)
    return out


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """floor(room) = 1 + max floor of the rooms it imports (1 for none), for an acyclic ``graph``."""
    out: dict[str, int] = {}

    def floor(room: str) -> int:
        if room not in out:
            out[room] = 1 + max((floor(r) for r in graph[room]), default=0)
        return out[room]

    for room in graph:
        floor(room)
    return out


def _where(edges: Edges, src: str, dst: str) -> str:
    return f"{source_modules()[src].relative_to(ROOT.parent)}:{','.join(map(str, edges[(src, dst)]))}"


# ---- the contract ----------------------------------------------------------------------------------------


def test_the_graph_reader_sees_every_kind_of_import() -> None:
    known = {"cbd_fast", "cbd_fast.core", "cbd_fast.core.attack", "cbd_fast.core.modes", "cbd_fast.ops"}
    source = textwrap.dedent(
        """
        from typing import TYPE_CHECKING
        import importlib
        import torch
        from cbd_fast.core import attack
        from cbd_fast.core.attack import contrastive_pgd
        if TYPE_CHECKING:
            from cbd_fast import ops
        def f():
            from . import modes
            from .. import ops
            return importlib.import_module("cbd_fast.app.cli")
        """
    )
    found = sorted(imports_of(source, "cbd_fast.core.features", is_package=False, known=known))
    assert found == [
        ("cbd_fast.app.cli", 12),
        ("cbd_fast.core.attack", 5),
        ("cbd_fast.core.attack", 6),
        ("cbd_fast.core.modes", 10),
        ("cbd_fast.ops", 8),
        ("cbd_fast.ops", 11),
        ("importlib", 3),
        ("torch", 4),
        ("typing", 2),
    ]


def test_the_graph_covers_the_package() -> None:
    edges = import_graph()
    modules = source_modules()
    assert {"cbd_fast", "cbd_fast.core.attack", "cbd_fast.ops.pgd", "cbd_fast.app.cli"} <= set(modules)
    assert ("cbd_fast.core.attack", "cbd_fast.ops.pgd") in edges


def test_no_import_cycle() -> None:
    edges = import_graph()
    graph = _adjacency(set(edges))
    cycles = [a_cycle(graph, component) for component in strongly_connected(graph)]
    lines = [
        " -> ".join(cycle) + "  (" + "; ".join(_where(edges, a, b) for a, b in zip(cycle, cycle[1:])) + ")"
        for cycle in cycles
    ]
    assert not cycles, f"{len(cycles)} import cycle(s) between modules:\n" + "\n".join(lines)


def test_layers() -> None:
    edges = import_graph()
    bad = [
        f"{src} imports {dst} ({_where(edges, src, dst)})"
        for src, dst in sorted(edges)
        if room_of(dst) in FORBIDDEN.get(room_of(src), ())
    ]
    assert not bad, "layer violations (ops/kernels < core < evaluation < app):\n" + "\n".join(bad)


def test_few_flat_modules() -> None:
    flat = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(flat) <= MAX_FLAT_MODULES, (
        f"{len(flat)} modules directly in {PACKAGE}/ (at most {MAX_FLAT_MODULES}): {', '.join(flat)}"
    )


def test_few_import_floors() -> None:
    graph = room_graph(import_graph())
    levels = floors(condensed(graph))
    table = "\n".join(
        f"  floor {level}: {', '.join(sorted(r for r in levels if levels[r] == level))}"
        for level in sorted(set(levels.values()))
    )
    tangled = strongly_connected(graph)
    assert not tangled, (
        "rooms import each other, so they share no floor order: "
        + "; ".join(" -> ".join(a_cycle(graph, c)) for c in tangled)
        + f"\nfloors (rooms that import each other merged with '+'):\n{table}"
    )
    assert max(levels.values()) <= MAX_FLOORS, (
        f"{max(levels.values())} import floors (at most {MAX_FLOORS}):\n{table}"
    )


def test_purify_loads_no_evaluation_or_app_module() -> None:
    code = textwrap.dedent(
        """
        import sys
        import torch
        import cbd_fast

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
        cbd_fast.purify(model, torch.rand(16, 1, 8, 8), epochs=1, batch_size=8, progress=False)
        loaded = sorted(m for m in sys.modules if m.startswith(("cbd_fast.evaluation", "cbd_fast.app")))
        print("LOADED", " ".join(loaded))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT.parent
    )
    assert proc.returncode == 0, (
        f"purify failed in a fresh interpreter (rc {proc.returncode}):\n{proc.stderr}"
    )
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED")]
    loaded = line.split()[1:]
    assert not loaded, f"cbd_fast.purify loaded evaluation/app modules: {', '.join(loaded)}"
