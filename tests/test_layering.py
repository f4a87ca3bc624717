"""The library's imports flow one way, and no file imports a file that imports it back.

The layers, lowest first (CONTRIBUTING.md, "Where code goes"): the bottom modules of
``megatron_srp/`` (``__init__``, ``taxonomy``, ``units``, ``endpoint``, ``tokenizer``,
``documents``, ``compat``, ``presets``, ``config``) -> ``reflection`` -> ``interventions`` ->
``data`` -> ``model`` -> ``validation`` -> ``training`` -> ``inference``, ``deploy`` ->
``evaluation`` -> ``serving`` -> ``medsafetyworld``, ``bench``; ``tools/`` scripts sit outside, on top. A
package may import itself and what lies below it, nothing beside or above.

The walker reads the source with ``ast`` (every ``import`` and ``from ... import``, those inside
functions included) and imports nothing, so a violation is found even where the import would
only run on some path (an import by name through ``importlib`` is not seen). A test on a
synthetic package shows that it does find both kinds of fault."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "megatron_srp"

# The modules at the root of the package that form the bottom layer; they may import each other
# (test 1 keeps that free of circles). Every other name is a layer of its own.
BOTTOM = ("__init__", "taxonomy", "units", "endpoint", "token_offsets", "chat_template", "tokenizer",
          "documents",
          "compat", "cli", "presets", "config")
# Lowest first. A layer may import itself and the layers of lower rank; layers of equal rank
# (inference and deploy, medsafetyworld and bench) may not import each other.
FLOW = ["bottom", "reflection", "interventions", "data", "model", "validation", "training",
        "inference deploy", "evaluation", "serving", "medsafetyworld bench"]
RANK = {layer: rank for rank, row in enumerate(FLOW) for layer in row.split()}


# ----------------------------------------------------------------------------- the walker


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package at ``root``
    (``pkg/a/__init__.py`` is ``pkg.a``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package, or None."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement in the file; a
    ``from pkg.a import b`` names the submodule ``pkg.a.b`` where it is one, else ``pkg.a``."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.append((target, node.lineno))
    return found


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """The package's modules and its file-level graph: module -> {imported module: line}."""
    modules = module_files(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        graph[module] = {}
        for target, line in imports_of(module, path, modules):
            graph[module].setdefault(target, line)
    return modules, graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first, white/grey/black)."""
    state: dict[str, int] = defaultdict(int)   # 0 unseen, 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state[target] == 1:
                return path[path.index(target):] + [target]
            if state[target] == 0:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state[node] == 0:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_of(module: str, bottom: tuple[str, ...]) -> str:
    """The layer a module belongs to: ``"bottom"`` for the root modules named in ``bottom``,
    else its package under the root, or its own name for another module at the root
    (``pkg.data.chat`` -> ``data``, ``pkg.validation`` -> ``validation``, ``pkg`` ->
    ``__init__``)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return "bottom" if name in bottom else name


def package_graph(root: Path, modules: dict[str, Path], graph: dict[str, dict[str, int]],
                  bottom: tuple[str, ...]) -> dict[tuple[str, str], list[str]]:
    """The layer-level graph: ``(layer, imported layer)`` -> the imports that make the edge,
    each as ``file:line imports module``; imports within a layer are left out."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, targets in sorted(graph.items()):
        source = layer_of(module, bottom)
        where = modules[module].relative_to(root.parent).as_posix()
        for target, line in sorted(targets.items()):
            into = layer_of(target, bottom)
            if into != source:
                edges[source, into].append(f"{where}:{line} imports {target}")
    return dict(edges)


def layer_violations(root: Path, modules: dict[str, Path], graph: dict[str, dict[str, int]],
                     rank: dict[str, int], bottom: tuple[str, ...]) -> list[str]:
    """Every import from one layer into another that is not below it, as ``file:line imports
    module (layer -> layer)``."""
    return [f"{why} ({source} -> {into})"
            for (source, into), whys in sorted(package_graph(root, modules, graph, bottom).items())
            if rank[into] >= rank[source] for why in whys]


# ----------------------------------------------------------------------------- the tests


def test_no_file_imports_a_file_that_imports_it_back():
    _, graph = import_graph(PACKAGE)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_layer_imports_only_itself_and_the_layers_below():
    modules, graph = import_graph(PACKAGE)
    unknown = sorted({layer_of(m, BOTTOM) for m in modules} - set(RANK))
    assert not unknown, f"modules or packages with no place in BOTTOM or FLOW: {unknown}"
    violations = layer_violations(PACKAGE, modules, graph, RANK, BOTTOM)
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_the_walker_finds_a_circle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("from pkg import util\n")
    (pkg / "util.py").write_text("def g():\n    import pkg.low.d\n")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("from .b import thing\n")
    # a imports b at module level, b imports c as a submodule, c imports a inside a function.
    (pkg / "low" / "a.py").write_text("import os\nfrom pkg.high import b\n")
    (pkg / "high" / "b.py").write_text("thing = 1\nfrom ..low import c\n")
    (pkg / "low" / "c.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "low" / "d.py").write_text("from pkg.low.c import f\nfrom pkg import base\n")

    modules, graph = import_graph(pkg)
    assert graph == {"pkg": {}, "pkg.base": {"pkg.util": 1}, "pkg.util": {"pkg.low.d": 2},
                     "pkg.low": {}, "pkg.high": {"pkg.high.b": 1},
                     "pkg.low.a": {"pkg.high.b": 2}, "pkg.high.b": {"pkg.low.c": 2},
                     "pkg.low.c": {"pkg.low.a": 2},
                     "pkg.low.d": {"pkg.low.c": 1, "pkg.base": 2}}
    assert " -> ".join(find_cycle(graph)) == "pkg.base -> pkg.util -> pkg.low.d -> pkg.base"

    rank = {"bottom": 0, "low": 1, "high": 2}
    assert package_graph(pkg, modules, graph, ("__init__", "base", "util")) == {
        ("bottom", "low"): ["pkg/util.py:2 imports pkg.low.d"],
        ("low", "high"): ["pkg/low/a.py:2 imports pkg.high.b"],
        ("high", "low"): ["pkg/high/b.py:2 imports pkg.low.c"],
        ("low", "bottom"): ["pkg/low/d.py:2 imports pkg.base"]}
    assert layer_violations(pkg, modules, graph, rank, ("__init__", "base", "util")) == [
        "pkg/util.py:2 imports pkg.low.d (bottom -> low)",
        "pkg/low/a.py:2 imports pkg.high.b (low -> high)"]

    (pkg / "low" / "d.py").write_text("from pkg.low.c import f\n")
    _, graph = import_graph(pkg)
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
    assert sorted(cycle[1:]) == ["pkg.high.b", "pkg.low.a", "pkg.low.c"]
    (pkg / "low" / "c.py").write_text("def f():\n    return 1\n")
    _, graph = import_graph(pkg)
    assert find_cycle(graph) is None
