"""Imports go one way (issue 15): a walk over the ``ast`` of every module under qviz/.

Nodes are modules by dotted name (a package's ``__init__`` is the package's own node); an edge is
an import anywhere in a module, inside functions included, to the module it names (``from p import
name`` is an edge to ``p.name`` when that is a module, else to ``p``). Importing ``p.m`` also runs
``p/__init__``; that implicit edge is not counted, or the package ``qviz`` (the public API, which
imports the Session) would sit in a cycle with everything. The rules:

(a) no import cycle between modules (strongly connected components of the graph);
(b) qviz.flows, qviz.capture, qviz.analysis and qviz.results never import qviz.ui, qviz.report,
    qviz.io, qviz.cli or qviz.session;
(c) qviz.ui never imports qviz.cli;
(d) no module imports the package ``qviz`` itself (``import qviz``, ``from qviz import
    __version__``): read the version from qviz.version;
(e) qviz.results (plain data) imports nothing of qviz but qviz.errors and qviz.version.
"""

from __future__ import annotations

import ast
import pathlib
from collections import deque
from itertools import pairwise

ROOT = pathlib.Path(__file__).resolve().parents[1] / "qviz"
LOW = {"flows", "capture", "analysis", "results"}
HIGH = {"ui", "report", "io", "cli", "session"}
RESULTS_MAY_IMPORT = {"errors", "version"}


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every module under ``root`` (a package directory) by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known) -> str | None:
    """The module ``name`` lives in: itself, else its nearest enclosing module."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, module: str, is_package: bool, known) -> list[str]:
    """The modules one import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        return [_resolve(a.name, known) for a in node.names]
    if node.level:  # relative: from the module's package, up level - 1 more
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else _resolve(base, known) for a in node.names]


def import_graph(root: pathlib.Path) -> dict[str, dict[str, str]]:
    """module -> {imported module: "path:line" of its first import}, for modules under ``root``."""
    known = modules(root)
    graph = {}
    for module, path in known.items():
        lines: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, path.name == "__init__.py", known):
                    if target is not None and target != module:
                        lines[target] = min(lines.get(target, node.lineno), node.lineno)
        where = path.relative_to(root.parent)
        graph[module] = {target: f"{where}:{line}" for target, line in lines.items()}
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        u = stack.pop()
                        on_stack.discard(u)
                        component.append(u)
                        if u == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif w not in graph:
                continue
            elif w not in index:
                index[w] = low[w] = len(index)
                stack.append(w)
                on_stack.add(w)
                work.append((w, iter(graph[w])))
            elif w in on_stack:
                low[v] = min(low[v], index[w])
    return found


def _loop(graph, component: list[str]) -> list[str]:
    """One shortest import loop through the component's first module, as a path."""
    members, start = set(component), component[0]
    came = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in graph[v]:
            if w == start:
                path = [v]
                while came[path[-1]] is not None:
                    path.append(came[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in came:
                came[w] = v
                queue.append(w)
    return component


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def violations(graph: dict[str, dict[str, str]], package: str = "qviz") -> list[str]:
    """Every break of rules (a) to (e), one readable line each."""
    found = []
    for component in cycles(graph):
        loop = _loop(graph, component)
        steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in pairwise(loop)]
        inside = [f"{a} -> {b} ({where})" for a in component for b, where in sorted(graph[a].items()) if b in component]
        found.append(f"(a) import cycle among {len(component)} modules, for instance " + "; ".join(steps)
                     + "\n    every import inside it: " + "\n    ".join(inside))
    for module, edges in sorted(graph.items()):
        mine = _layer(module)
        for target, where in sorted(edges.items()):
            theirs = _layer(target)
            if mine in LOW and theirs in HIGH:
                found.append(f"(b) {where}: {module} imports {target} ({package}.{mine} may not import {package}.{theirs})")
            if mine == "ui" and theirs == "cli":
                found.append(f"(c) {where}: {module} imports {target} ({package}.ui may not import {package}.cli)")
            if target == package:
                found.append(f"(d) {where}: {module} imports the package {package} itself (use {package}.version)")
            if mine == "results" and theirs not in RESULTS_MAY_IMPORT | {"results"}:
                found.append(f"(e) {where}: {module} imports {target} ({package}.results may import only "
                             f"{', '.join(f'{package}.{m}' for m in sorted(RESULTS_MAY_IMPORT))})")
    return found


def test_imports_go_one_way():
    broken = violations(import_graph(ROOT))
    assert not broken, "imports that break the layering (see this file's docstring):\n" + "\n".join(broken)


def test_the_walk_finds_every_kind_of_violation(tmp_path):
    """A tiny fake qviz with one break of each rule, then the same tree mended."""
    files = {
        "__init__.py": "from qviz.session import Session\n",
        "errors.py": "",
        "version.py": "__version__ = '0'\n",
        "session.py": "from qviz.results import records\n",
        "cli.py": "",
        "a.py": "def f():\n    import qviz.b\n",  # inside a function: still an edge
        "b.py": "from qviz import a\n",  # a submodule: an edge to qviz.a, so a -> b -> a
        "capture/__init__.py": "",
        "capture/probe.py": "from qviz.ui.view import View\n",
        "ui/__init__.py": "",
        "ui/view.py": "import qviz.cli\nView = 1\n",
        "flows/__init__.py": "",
        "flows/f.py": "import qviz\n",
        "results/__init__.py": "from .records import R\n",
        "results/records.py": "from qviz.errors import E\nfrom ..version import __version__\nfrom ..capture import probe\nR = 1\n",
    }
    for name, text in files.items():
        (tmp_path / "qviz" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "qviz" / name).write_text(text)
    graph = import_graph(tmp_path / "qviz")
    assert graph["qviz.a"] == {"qviz.b": "qviz/a.py:2"} and graph["qviz.results"] == {"qviz.results.records": "qviz/results/__init__.py:1"}
    assert set(graph["qviz.results.records"]) == {"qviz.errors", "qviz.version", "qviz.capture.probe"}
    broken = violations(graph)
    rules = sorted(line[:3] for line in broken)
    assert rules == ["(a)", "(b)", "(c)", "(d)", "(e)"], broken
    assert "qviz.a -> qviz.b (qviz/a.py:2); qviz.b -> qviz.a (qviz/b.py:1)" in broken[0]
    assert any("qviz/capture/probe.py:1: qviz.capture.probe imports qviz.ui.view" in line for line in broken)
    assert any("qviz/results/records.py:3" in line and "qviz.capture.probe" in line for line in broken)

    mended = {"b.py": "", "capture/probe.py": "", "ui/view.py": "View = 1\n", "flows/f.py": "from qviz.version import __version__\n",
              "results/records.py": "from qviz.errors import E\nfrom ..version import __version__\nR = 1\n"}
    for name, text in mended.items():
        (tmp_path / "qviz" / name).write_text(text)
    assert violations(import_graph(tmp_path / "qviz")) == []


def test_a_longer_cycle_is_reported_as_one_loop(tmp_path):
    for name, target in {"x": "y", "y": "z", "z": "x", "w": "x"}.items():
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / "pkg" / f"{name}.py").write_text(f"from pkg.{target} import thing\n")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    graph = import_graph(tmp_path / "pkg")
    assert cycles(graph) == [["pkg.x", "pkg.y", "pkg.z"]]
    assert _loop(graph, ["pkg.x", "pkg.y", "pkg.z"]) == ["pkg.x", "pkg.y", "pkg.z", "pkg.x"]


# -- the core knows no flow by name ---------------------------------------------------------------
CORE = ["session.py", "plan.py", "options.py", "ui"]  # where only the registry may say which flows exist
FLOW_NAMES = ("fx", "eager", "pt2e", "torchao")  # "dynamic" is also a point role, checked apart below


def flow_name_uses(root: pathlib.Path) -> list[str]:
    """String literals naming a built-in flow, and comparisons of a flow's name with a literal,
    in the core modules (docstrings and comments say what they like)."""
    found = []
    for entry in CORE:
        for path in sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry]:
            tree = ast.parse(path.read_text(), filename=str(path))
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)
                          and isinstance(node.body[0].value, ast.Constant)}
            where = path.relative_to(root.parent)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in FLOW_NAMES and id(node) not in docstrings:
                    found.append(f"{where}:{node.lineno}: the literal {node.value!r}")
                if isinstance(node, ast.Compare) and any(
                    isinstance(side, ast.Attribute) and side.attr == "name" and "flow" in ast.unparse(side.value)
                    for side in (node.left, *node.comparators)
                ) and any(isinstance(side, ast.Constant) for side in (node.left, *node.comparators)):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_core_names_no_flow():
    found = flow_name_uses(ROOT)
    assert not found, "flow names outside the registry (ask the flow, see qviz.flows.base.Flow):\n" + "\n".join(found)


def test_the_flow_name_check_finds_what_it_looks_for(tmp_path):
    (tmp_path / "qviz" / "ui").mkdir(parents=True)
    (tmp_path / "qviz" / "session.py").write_text('"""Mentions "fx" in a docstring."""\nif self.flow.name == "dynamic":\n    pass\n')
    (tmp_path / "qviz" / "plan.py").write_text("FLOWS = ('fx',)\n")
    (tmp_path / "qviz" / "options.py").write_text("")
    (tmp_path / "qviz" / "ui" / "view.py").write_text("def f(flow):\n    return {'torchao': 1}\n")
    found = flow_name_uses(tmp_path / "qviz")
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in found] == [
        "qviz/session.py:2", "qviz/plan.py:1", "qviz/ui/view.py:2"], found
