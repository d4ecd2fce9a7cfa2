"""The import layers of lora_gui, checked on the source (docs/architecture.md states them).

Every ``import`` and ``from ... import`` of every module is read with ``ast`` (function-level and
``TYPE_CHECKING`` imports included), so an import hidden inside a function cannot cross a layer.

    (atomic)  <-  settings, events  <-  dataset  <-  engine  <-  worker  <-  ui  <-  cli

A module may import the modules of its own package and of the layers below it, never those above
it or its peer (settings and events import neither each other nor anything else of lora_gui but
``atomic``; the command line is on top only to start the page: ``lora-gui gui``). The page
(``lora_gui.ui``) never imports ``lora_gui.engine``, although the engine is below it: the web
process must not load torch. And no modules import each other at run time, directly or through
others (no cycles); an import under ``if TYPE_CHECKING:`` never runs, so it counts for the layers
but not for cycles (it is how a module names a type without importing its module at run time).

Standard library only, and it never imports lora_gui: it reads the files of any copy of the package
(the test runs it over a copy with a wrong import added, to show that it fails).
Usage: ``python tests/support/layers.py [PACKAGE_DIR]`` (default: ./lora_gui); exit 1 on a violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# package (or top-level module) -> layer; higher layers may import lower ones.
LAYERS: dict[str, int] = {
    "__init__": 0, "atomic": 0,  # lora_gui/atomic.py: atomic file writes, standard library only
    "settings": 1, "events": 1,
    "dataset": 2,
    "engine": 3,
    "worker": 4,
    "ui": 5,
    "cli": 6,  # the command line: `lora-gui gui` starts the page's launcher
}
SAME_LAYER_AS = {"cli_terminal": "cli"}  # lora_gui/cli_terminal.py is part of the command line
NEVER: dict[str, set[str]] = {"ui": {"engine"}}  # imports forbidden although the layer allows them


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    package_dir = Path(package_dir)
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _type_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports that never run)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return found


def _imported(tree: ast.AST, module: str, is_package: bool, runtime_only: bool = False):
    """(line, dotted name) of everything a module imports; ``from X import Y`` yields ``X.Y``
    (the caller keeps it when it is a module, else falls back to ``X``). ``runtime_only`` leaves
    out the imports under ``if TYPE_CHECKING:``."""
    skip = _type_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base


def import_graph(package_dir: Path, runtime_only: bool = False) -> dict[str, dict[str, int]]:
    """Module -> {imported module of the package: line}; with ``runtime_only``, without the
    imports under ``if TYPE_CHECKING:``."""
    names = module_names(package_dir)
    root = Path(package_dir).name
    graph: dict[str, dict[str, int]] = {}
    for module, path in names.items():
        edges = graph.setdefault(module, {})
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, name in _imported(tree, module, path.name == "__init__.py", runtime_only):
            while name and name not in names:  # `from pkg import function` -> pkg
                name = name.rpartition(".")[0]
            if name.split(".")[0] == root and name != module:
                edges.setdefault(name, line)
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return SAME_LAYER_AS.get(name, name)


def layer_violations(graph: dict[str, dict[str, int]], files: dict[str, Path]) -> list[str]:
    bad = []
    for module, edges in sorted(graph.items()):
        mine = layer_of(module)
        for target, line in sorted(edges.items()):
            theirs = layer_of(target)
            if theirs == mine:
                continue
            if theirs not in LAYERS or mine not in LAYERS:
                bad.append(f"{files[module]}:{line}: {module} imports {target}, but "
                           f"{theirs if theirs not in LAYERS else mine!r} has no layer: add it to "
                           "LAYERS and docs/architecture.md")
            elif LAYERS[theirs] >= LAYERS[mine] or theirs in NEVER.get(mine, ()):
                bad.append(f"{files[module]}:{line}: {module} imports {target} "
                           f"({mine} must not import {theirs})")
    return bad


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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


def check(package_dir: str | Path) -> list[str]:
    """Every layer violation and import cycle of the package, one sentence each."""
    package_dir = Path(package_dir)
    files = {m: p.relative_to(package_dir.parent) for m, p in module_names(package_dir).items()}
    graph = import_graph(package_dir)
    bad = layer_violations(graph, files)
    bad += [f"import cycle: {' <-> '.join(c)}: move the shared code into a module both can import"
            for c in cycles(import_graph(package_dir, runtime_only=True))]
    return bad


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]) if argv else Path("lora_gui")
    bad = check(package_dir)
    for line in bad:
        print(line)
    print(f"{'FAIL' if bad else 'OK'}: {len(bad)} layer violations or cycles "
          f"over {len(module_names(package_dir))} modules")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
