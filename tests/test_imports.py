"""The package's import structure: no import cycles, and no heavy optional imports.

The rule: no module of ``bdia`` imports one that imports it back, directly or through
others. The graph is built statically from the source, so an import that runs only in a
function (a lazy import) or only on some path counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO, run_child

PACKAGE = REPO / "bdia"


def module_names(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Every module under ``root``: dotted name -> (file, whether it is a package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def imported_modules(
    name: str, path: Path, is_package: bool, modules: dict[str, object]
) -> set[str]:
    """The modules of ``modules`` that ``name`` imports anywhere in its source.

    ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b`` when that is a module
    and ``a`` otherwise; relative imports are resolved against the module's package.
    Importing ``a.b`` also runs ``a/__init__``, but that implicit edge is left out: every
    package that re-exports its submodules would close a cycle through it.
    """
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                if node.module:
                    base_parts.append(node.module)
                base = ".".join(base_parts)
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    resolved = set()
    for target in found:
        # ``import a.b.c`` where only ``a.b`` is ours (c an attribute): the nearest module.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {
        name: imported_modules(name, path, is_package, modules)
        for name, (path, is_package) in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) in each strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:  # Tarjan's algorithm
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest path from start back to start inside the component (breadth first).
        paths = {w: [start, w] for w in sorted(graph[start]) if w in members}
        queue = list(paths)
        while start not in paths:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        cycles.append(paths[start])
    return cycles


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # checkpoints imports digits at the top (``from . import digits, networks``) ...
    assert {"bdia.models.digits", "bdia.models.networks"} <= graph["bdia.models.checkpoints"]
    # ... and digits imports the FID module only inside frechet_digit_distance.
    assert "bdia.metrics.fid" in graph["bdia.models.digits"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.slow  # another process: its start costs seconds on busy cores
@pytest.mark.parametrize("module", ["bdia", "bdia.cli"])
def test_import_bdia_leaves_optional_heavy_packages_alone(module):
    # scipy (through torchdiffeq, for the toy references and FID's matrix square root) costs
    # half a second to import, which the command line would pay at every command
    heavy = ("diffusers", "matplotlib", "scipy", "torchdiffeq", "transformers")
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    proc = run_child(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
