"""No import cycles inside a package, read from the source (not from what happens to load).

Every module of each package is parsed; every ``import`` statement counts, function-local ones
included (a cycle held open only by a deferred import is still a cycle in the design). Imports
under ``if TYPE_CHECKING:`` do not run and are left out. ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``). Importing a submodule
does not add an edge to its parent package: a package ``__init__`` that re-exports its
submodules is the usual facade, not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "kt_kernels": ROOT / "packages" / "kt-kernels" / "src" / "kt_kernels",
    "kt_models": ROOT / "packages" / "kt-models" / "src" / "kt_models",
    "kt_sft": ROOT / "packages" / "kt-sft" / "src" / "kt_sft",
    "kt_accelerate": ROOT / "packages" / "kt-accelerate" / "src" / "kt_accelerate",
}


def _modules(package: str, root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    out: dict[str, Path] = {}
    # A compiled extension (``_core.*.so``) is a module too; its ``.pyi`` stub names it.
    for path in sorted(root.rglob("*.pyi")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        out[".".join([package, *parts])] = path
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _edges(module: str, path: Path, known: dict[str, Path], package: str) -> set[str]:
    if path.suffix == ".pyi":
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            targets.add(sub if sub in known else source)
    out = set()
    for target in targets:
        # `import a.b.c` loads a.b.c: the edge goes to the deepest module of this package.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != module and target.split(".")[0] == package:
            out.add(target)
    return out


def import_graph(package: str, root: Path) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports."""
    known = _modules(package, root)
    return {m: _edges(m, p, known, package) for m, p in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def _cycle_through(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """One closed path inside a strongly connected component (shortest back to its start)."""
    start = min(members)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(members)  # pragma: no cover - a component always has a cycle


#: Known cycles (package -> why), kept visible as strict xfails: the test fails once one is gone.
KNOWN: dict[str, str] = {}


@pytest.mark.parametrize(
    "package",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN[p])) if p in KNOWN else p
        for p in sorted(PACKAGES)
    ],
)
def test_no_import_cycle_inside_package(package: str) -> None:
    root = PACKAGES[package]
    if not root.is_dir():
        pytest.skip(f"{root} is not in this checkout")
    graph = import_graph(package, root)
    cycles = find_cycles(graph)
    assert not cycles, f"{package} has {len(cycles)} import cycle(s):\n" + "\n".join(
        f"{' -> '.join(_cycle_through(graph, set(c)))} (all of {', '.join(c)} reach each other)"
        for c in cycles
    )


def test_cycle_finder_names_the_cycle() -> None:
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert _cycle_through(graph, {"p.a", "p.b", "p.c"}) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycles({"p.a": {"p.b"}, "p.b": set()}) == []
