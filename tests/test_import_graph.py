"""No import cycle inside guide_fast (issue 11): every module's imports, at module level AND inside
functions, form a graph without cycles.

Edges: `import a.b.c` and `from a.b import c` (c a module) point at a.b.c; `from a.b import name`
(name not a module) at a.b; relative imports are resolved against the importing module. Imports
under `if TYPE_CHECKING:` never run and are left out. As in import-linter/grimp, the implicit
execution of a parent package's __init__ is not an edge of its own: package __init__ files are
kept thin (re-exports only), and their own imports are edges like any other. String imports
(`importlib.import_module(...)`: guide_fast.__getattr__, cli.COMMAND_MODULES) are not followed:
they are the deliberate, lazy entry points. guide_fast.kernels (the top-level kernels/ folder,
installed under that name) is walked as part of the package.
"""
from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import guide_fast

ROOT = "guide_fast"


def _modules() -> dict[str, Path]:
    """Every module of guide_fast (and guide_fast.kernels) -> its source file, without importing them."""
    found: dict[str, Path] = {}
    packages = [(ROOT, list(guide_fast.__path__))]
    kernels = importlib.util.find_spec(f"{ROOT}.kernels")
    if kernels is not None and kernels.submodule_search_locations:
        packages.append((f"{ROOT}.kernels", list(kernels.submodule_search_locations)))
    for name, paths in packages:
        found[name] = Path(paths[0]) / "__init__.py"
        for info in pkgutil.walk_packages(paths, prefix=name + "."):
            base = Path(info.module_finder.path) / info.name.rsplit(".", 1)[-1]
            found[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return {k: v for k, v in found.items() if v.is_file()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Import / ImportFrom nodes anywhere in the tree (functions, methods, try blocks), except
    the body of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _edges(name: str, path: Path, modules: set[str]) -> dict[str, int]:
    """Imported guide_fast module -> line of the first import of it in `name`."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in modules and target != name:
            out.setdefault(target, line)

    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        if node.level:
            base_parts = package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            add(sub if sub in modules else base, node.lineno)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    names = set(modules)
    return {name: _edges(name, path, names) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        iters = [iter(sorted(graph[start]))]
        state[start] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, {}))))
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_walk_sees_the_whole_package():
    graph = import_graph()
    for name in ("guide_fast.plan", "guide_fast.render.dispatch", "guide_fast.eg3d.generator",
                 "guide_fast.unlearn.engine", "guide_fast.unlearn.report", "guide_fast.kernels.triplane_render"):
        assert name in graph, name
    # function-level imports are edges too (the engine saves through report inside a method)
    assert "guide_fast.unlearn.report" in graph["guide_fast.unlearn.engine"]
    assert "guide_fast.kernels.triplane_render" in graph["guide_fast.render.dispatch"]


def test_no_import_cycle_in_guide_fast():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + _describe(cycle, graph)


def test_layering_render_never_imports_upwards():
    """The renderer is usable by any tri-plane model: it imports nothing from eg3d, unlearn,
    evaluation or inversion, and the kernels import only render's small types (and errors)."""
    graph = import_graph()
    for name, edges in graph.items():
        if name == "guide_fast.render" or name.startswith("guide_fast.render."):
            upward = [t for t in edges if t.split(".")[1] in ("eg3d", "unlearn", "evaluation", "inversion",
                                                                "checkpoints", "commands", "cli")]
            assert not upward, f"{name} imports {upward}"
        if name.startswith("guide_fast.kernels"):
            allowed = {"guide_fast.render.types", "guide_fast.errors"}
            outside = [t for t in edges if not t.startswith("guide_fast.kernels") and t not in allowed]
            assert not outside, f"{name} imports {outside}"


def test_cycle_finder_reports_the_path():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert _describe(cycle, graph).count("->") == 3
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_public_names_resolve_and_the_readme_example_uses_only_them():
    """Every name guide_fast exports lazily resolves, and the README's library example needs
    nothing but `import guide_fast as gf` (no reaching into submodules)."""
    import re

    for name in guide_fast.__all__:
        assert getattr(guide_fast, name) is not None, name
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "Unlearner" in b)
    imports = [line for line in example.splitlines() if re.match(r"\s*(from|import) ", line)]
    assert imports == ["import guide_fast as gf"], imports
    used = set(re.findall(r"\bgf\.(\w+)", example))
    assert used and all(hasattr(guide_fast, n) for n in used), sorted(n for n in used if not hasattr(guide_fast, n))
