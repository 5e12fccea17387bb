"""The shape of the package, read from the source with ``ast`` (nothing is imported):

* no import cycle among the modules of ``fastlt/``, ``kernels/`` and ``pipelines/`` —
  counting imports inside functions too (a lazy import is still a dependency, and a cycle
  of them is a tangle a reader has to hold in their head), the packages a submodule import
  runs (``import a.b.c`` executes ``a/__init__`` and ``a/b/__init__``), the names a package
  re-exports lazily (``from fastlt.method import rectify_labels`` depends on
  ``fastlt.method.labels``) and ``importlib.import_module`` calls with literal names;
* every package ``__init__`` has a docstring (what lives there) and ``__all__`` (its public
  names, once);
* no module over 400 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Source folder -> the package it is installed as (setup.py's package_dir).
PACKAGES = {"fastlt": "fastlt", "kernels": "fastlt.kernels", "pipelines": "fastlt.pipelines"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the three source folders."""
    mods = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _lazy_exports(name: str) -> dict[str, str]:
    """{public name: module} of a package ``__init__`` that calls ``lazy_exports(__name__, {...})``."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports" and len(node.args) == 2
                and isinstance(node.args[1], ast.Dict)):
            return {k.value: f"{name}.{v.value}" for k, v in zip(node.args[1].keys, node.args[1].values)}
    return {}


def _own_packages(importer: str) -> set[str]:
    """The packages that contain ``importer`` (and itself, if a package): already imported
    before any of their submodules runs, so importing through them adds no dependency."""
    parts = importer.split(".")
    own = {".".join(parts[:i]) for i in range(1, len(parts))}
    return own | ({importer} if _is_package(importer) else set())


def _with_parents(name: str, importer: str) -> list[str]:
    """``a.b.c`` and the packages of ours that importing it executes (``a``, ``a.b``), less the
    importer's own packages."""
    parts = name.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    own = _own_packages(importer)
    return [m for m in chain[:-1] if m in MODULES and m not in own] + ([name] if name in MODULES else [])


def _resolve(module: str, level: int, importer: str) -> str:
    if level == 0:
        return module
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str) -> set[str]:
    """The modules of ours that ``name`` imports anywhere in its source (see the module docstring)."""
    deps: set[str] = set()
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, name)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # a submodule: its package runs first, but is no dependency by itself
                    targets.append(sub)
                    continue
                targets.append(base)  # a name read from the module (or package) ``base``
                package = base  # a lazy re-export: follow it to the module defining the name
                while package in MODULES and _is_package(package) and alias.name in _lazy_exports(package):
                    package = _lazy_exports(package)[alias.name]
                    targets.append(package)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and isinstance(node.args[0].value, str)):
            literal = node.args[0].value
            level = len(literal) - len(literal.lstrip("."))
            targets = [_resolve(literal.lstrip("."), level, name)]
        for target in targets:
            deps.update(_with_parents(target, name))
    deps.discard(name)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list."""
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


def _path_within(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, for the failure message."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_the_module_list_is_complete():
    """The checks below see the modules that matter (a broken walk would make them pass vacuously)."""
    for name in ("fastlt.method.labels", "fastlt.kernels.rectify", "fastlt.pipelines.dali_train",
                 "fastlt.training.trainer", "fastlt.kernels", "fastlt.pipelines"):
        assert name in MODULES, name
    # And the walk sees function-level and lazily re-exported imports: the label dispatch point
    # reaches the Triton kernel inside a function, the objective through the kernels package.
    assert "fastlt.kernels.rectify" in _imports("fastlt.method.labels")
    assert "fastlt.kernels" in _imports("fastlt.method.objective")
    assert "fastlt.kernels.compact" in _imports("fastlt.kernels")
    assert _lazy_exports("fastlt.method")["rectify_labels"] == "fastlt.method.labels"



def test_kernels_and_pipelines_only_as_fastlt_subpackages():
    """``kernels``/``pipelines`` are installed as ``fastlt.kernels``/``fastlt.pipelines`` only (both top-level
    names are taken on PyPI): an ``import kernels`` works in the source tree and fails once installed."""
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            bad += [f"{path.relative_to(REPO)}:{node.lineno}: {m}" for m in mods
                    if m.split(".")[0] in ("kernels", "pipelines")]
    assert not bad, "import fastlt.kernels / fastlt.pipelines instead:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {name: _imports(name) for name in MODULES}
    cycles = _cycles(graph)
    described = ["  " + " -> ".join(_path_within(graph, c)) + f"   (component: {', '.join(c)})" for c in cycles]
    assert not cycles, ("import cycles (top-level or inside functions); make the dependency go one way, e.g. "
                        "move what both need into a module that imports neither:\n" + "\n".join(described))


@pytest.mark.parametrize("package", sorted(n for n in MODULES if _is_package(n)))
def test_package_init_has_docstring_and_all(package):
    tree = ast.parse(MODULES[package].read_text())
    doc = ast.get_docstring(tree)
    assert doc and len(doc.split()) >= 10, f"{MODULES[package]}: needs a docstring saying what lives in the package"
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                for t in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(t, ast.Name)}
    assert "__all__" in assigned, f"{MODULES[package]}: needs __all__ (the package's public names, once)"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"
