"""mmfed's dependency rules, declared once below and checked from the source alone.

A hospital runs ``mmfed.site`` and a coordinator runs ``mmfed.server``; they meet only
in the message contract (``mmfed.wire``) and the common packages, so that either side
can change, be audited or be shipped without the other. Some packages must also stay
light: secure aggregation has to be checkable without Flower or torch, and the
ClientApp's secure-aggregation stages run in a fresh process per message, where
importing torch alone would cost seconds. Nothing here is imported: every module
under ``mmfed/`` is parsed with ``ast``, imports inside functions and under
``if TYPE_CHECKING:`` included, so a rule cannot be dodged by importing late.
``test_checker_reports_every_broken_rule`` shows the checker fails when it should.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "mmfed"
LAYOUT_TOOL = ROOT.parent / "shared" / "tools" / "layout.py"

# --------------------------------------------------------------------------- the rules

MAX_TOP_LEVEL_MODULES = 10  # .py files directly in mmfed/, __init__ aside
# Role packages that never import each other, in either direction.
NEVER_IMPORT_EACH_OTHER = (("mmfed.site", "mmfed.server"),)
# What both roles build on. mmfed.files holds the durable-write helpers that the site's
# ledger and the server's run directory share.
COMMON = ("mmfed.wire", "mmfed.config", "mmfed.errors", "mmfed.files", "mmfed.ml",
          "mmfed.secagg", "mmfed.data")
# A package listed here may import, within mmfed, only itself and these. Privacy is
# owned and enforced by the site; run directories, resume and tracking by the server.
MAY_IMPORT_ONLY = {
    "mmfed.site": (*COMMON, "mmfed.privacy"),
    "mmfed.server": (*COMMON, "mmfed.run"),
}
# Third-party packages a package never imports, anywhere in it.
MUST_NOT_IMPORT = {
    "mmfed.secagg": ("flwr", "torch"),
    "mmfed.ml": ("flwr",),
    "mmfed.config": ("torch",),
    "mmfed.wire": ("torch",),
}
# Modules whose import must not load these, directly or through the mmfed modules they
# import at module level (imports inside functions and TYPE_CHECKING blocks are free).
CHEAP_TO_IMPORT = {
    "mmfed.site.app": ("torch", "pandas", "opacus"),
    "mmfed.wire": ("torch", "pandas", "opacus"),
    "mmfed.config": ("torch", "pandas", "opacus"),
}
RULES = ("no-cycles", "roles-apart", "allowed-imports", "banned-imports", "cheap-imports",
         "top-level-modules")

# --------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class Edge:
    """One imported name: internal targets are mmfed modules, external ones top-level
    package names; ``eager`` when it runs as the importing module is imported."""

    importer: str
    line: int
    target: str
    internal: bool
    eager: bool


@dataclass(frozen=True)
class Violation:
    rule: str
    module: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.module} line {self.line}: {self.what} [rule {self.rule}]"


def find_modules(package_dir: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(node: ast.AST, eager: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``node``, and whether it runs at import time."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, eager
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _imports(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), False)
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), eager)
        else:
            yield from _imports(child, eager)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The mmfed module an imported dotted name lives in (a name inside it is trimmed)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def find_edges(package_dir: Path) -> tuple[dict[str, Path], list[Edge]]:
    modules = find_modules(package_dir)
    package = package_dir.name
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, eager in _imports(tree, True):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif node.level:
                parts = module.split(".")
                if path.name != "__init__.py":
                    parts = parts[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                base = node.module or ""
                names = [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                top = name.split(".")[0]
                if top != package and not (isinstance(node, ast.ImportFrom) and node.level):
                    edges.append(Edge(module, node.lineno, top, False, eager))
                    continue
                owner = _owner(name, modules)
                if owner is not None:
                    edges.append(Edge(module, node.lineno, owner, True, eager))
    return modules, edges


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _dependency_graph(modules: dict[str, Path], edges: list[Edge]) -> dict[str, dict[str, int]]:
    """importer -> {imported module: first line}, as ``layout.py`` counts them: a module
    importing its own package, or the root package, is no dependency."""
    root = min(modules, key=len)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for e in edges:
        if (e.internal and e.target not in (e.importer, root)
                and not e.importer.startswith(e.target + ".")):
            graph[e.importer][e.target] = min(e.line, graph[e.importer].get(e.target, e.line))
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
    return sorted(found)


def _shortest_cycle(graph: dict[str, dict[str, int]], members: list[str]) -> list[str]:
    start, inside = members[0], set(members)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if w in inside and w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def check_cycles(modules: dict[str, Path], edges: list[Edge]) -> list[Violation]:
    graph = _dependency_graph(modules, edges)
    out = []
    for members in _strongly_connected(graph):
        cycle = _shortest_cycle(graph, members)
        steps = "; ".join(f"{a} line {graph[a][b]} imports {b}"
                          for a, b in itertools.pairwise(cycle))
        more = f" (the loop spans {', '.join(members)})" if len(members) > len(cycle) - 1 else ""
        out.append(Violation("no-cycles", cycle[0], graph[cycle[0]][cycle[1]],
                             f"import cycle {' -> '.join(cycle)}: {steps}{more}"))
    return out


def check_roles_apart(modules: dict[str, Path], edges: list[Edge]) -> list[Violation]:
    out = []
    for a, b in NEVER_IMPORT_EACH_OTHER:
        for e in edges:
            if e.internal and ((_inside(e.importer, a) and _inside(e.target, b))
                               or (_inside(e.importer, b) and _inside(e.target, a))):
                out.append(Violation("roles-apart", e.importer, e.line,
                                     f"imports {e.target} ({a} and {b} never import each "
                                     "other)"))
    return out


def check_allowed(modules: dict[str, Path], edges: list[Edge]) -> list[Violation]:
    out = []
    for package, allowed in MAY_IMPORT_ONLY.items():
        for e in edges:
            if (e.internal and _inside(e.importer, package) and not _inside(e.target, package)
                    and not any(_inside(e.target, ok) for ok in allowed)):
                out.append(Violation("allowed-imports", e.importer, e.line,
                                     f"imports {e.target} ({package} may import only "
                                     f"itself and {', '.join(allowed)})"))
    return out


def check_banned(modules: dict[str, Path], edges: list[Edge]) -> list[Violation]:
    out = []
    for package, banned in MUST_NOT_IMPORT.items():
        for e in edges:
            if not e.internal and e.target in banned and _inside(e.importer, package):
                out.append(Violation("banned-imports", e.importer, e.line,
                                     f"imports {e.target} ({package} imports nothing from "
                                     f"{' or '.join(banned)})"))
    return out


def check_cheap(modules: dict[str, Path], edges: list[Edge]) -> list[Violation]:
    """Breadth-first through what importing the module runs: its packages' __init__
    files, then every module-level import, to the first heavy third-party import."""
    loads: dict[str, list[Edge]] = {m: [] for m in modules}
    for m in modules:
        parent = m.rpartition(".")[0]
        if parent in modules:  # loading a module first loads its package
            loads[m].append(Edge(m, 0, parent, True, True))
    for e in edges:
        if e.eager:
            loads[e.importer].append(e)
            if e.internal:  # `import a.b.c` also loads a and a.b
                parent = e.target.rpartition(".")[0]
                while parent in modules:
                    loads[e.importer].append(Edge(e.importer, e.line, parent, True, True))
                    parent = parent.rpartition(".")[0]
    out = []
    for start, heavy in CHEAP_TO_IMPORT.items():
        if start not in modules:
            continue
        how: dict[str, list[Edge]] = {start: []}
        queue = deque([start])
        reported: set[str] = set()
        while queue:
            m = queue.popleft()
            for e in loads[m]:
                if not e.internal:
                    if e.target in heavy and e.target not in reported:
                        reported.add(e.target)
                        chain = [*how[m], e]
                        steps = " -> ".join(
                            f"{s.importer} {'(its package)' if s.line == 0 else f'line {s.line}'}"
                            for s in chain)
                        out.append(Violation("cheap-imports", start, chain[0].line,
                                             f"importing it loads {e.target}: {steps} imports "
                                             f"{e.target} ({start} must not load "
                                             f"{', '.join(heavy)} when imported)"))
                elif e.target not in how:
                    how[e.target] = [*how[m], e]
                    queue.append(e.target)
    return out


def top_level_modules(package_dir: Path) -> list[str]:
    return sorted(p.stem for p in package_dir.glob("*.py") if p.stem != "__init__")


def check_top_level(package_dir: Path) -> list[Violation]:
    top = top_level_modules(package_dir)
    if len(top) <= MAX_TOP_LEVEL_MODULES:
        return []
    return [Violation("top-level-modules", package_dir.name, 0,
                      f"{len(top)} top-level modules ({', '.join(top)}); at most "
                      f"{MAX_TOP_LEVEL_MODULES}")]


def violations(package_dir: Path, rule: str | None = None) -> list[Violation]:
    """Every broken rule (or only ``rule``) in the package at ``package_dir``."""
    modules, edges = find_edges(package_dir)
    checks = {"no-cycles": lambda: check_cycles(modules, edges),
              "roles-apart": lambda: check_roles_apart(modules, edges),
              "allowed-imports": lambda: check_allowed(modules, edges),
              "banned-imports": lambda: check_banned(modules, edges),
              "cheap-imports": lambda: check_cheap(modules, edges),
              "top-level-modules": lambda: check_top_level(package_dir)}
    assert set(checks) == set(RULES)
    return [v for name in RULES if rule in (None, name) for v in checks[name]()]


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("rule", RULES)
def test_mmfed_keeps_its_dependency_rules(rule: str) -> None:
    found = violations(PACKAGE_DIR, rule)
    assert not found, "\n".join(map(str, found))


@pytest.mark.skipif(not LAYOUT_TOOL.is_file(), reason="the shared layout tool is not here")
def test_layout_tool_agrees() -> None:
    """The workspace's own structure tool counts the same modules and cycles."""
    proc = subprocess.run([sys.executable, str(LAYOUT_TOOL), str(PACKAGE_DIR)],
                          capture_output=True, text=True, timeout=120, check=True)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["top_level_modules"] <= MAX_TOP_LEVEL_MODULES, figures
    assert figures["top_level_modules"] == len(top_level_modules(PACKAGE_DIR))
    modules, edges = find_edges(PACKAGE_DIR)
    assert figures["modules"] == len(modules)
    ours = _strongly_connected(_dependency_graph(modules, edges))
    assert sorted(map(sorted, figures["cycles"])) == ours


BROKEN = {  # a tiny package named mmfed that breaks every rule at known lines
    "__init__.py": "",
    "a.py": "from mmfed import b\n",
    "b.py": "def late():\n    import mmfed.a\n",
    "config.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import torch\n",
    "wire.py": "from .ml import heavy\n\n\ndef late():\n    import torch.nn\n",
    "site/__init__.py": "",
    "site/app.py": "from mmfed.ml import heavy\n\n\ndef late():\n    import opacus\n",
    "site/x.py": "from mmfed.server import y\n",
    "site/z.py": "import json\nfrom mmfed.run import rundir\nfrom mmfed import wire, errors\n",
    "server/__init__.py": "",
    "server/y.py": ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from ..site.x import thing\nelse:\n"
                    "    from mmfed.privacy import ledger\n"),
    "server/w.py": "from mmfed.run.rundir import RunDir\nfrom mmfed.data import reader\n",
    "run/__init__.py": "",
    "run/rundir.py": "",
    "privacy/__init__.py": "",
    "privacy/ledger.py": "",
    "data/__init__.py": "",
    "data/reader.py": "",
    "errors.py": "",
    "ml/__init__.py": "",
    "ml/heavy.py": "import numpy\nimport pandas as pd\n",
    "ml/m.py": "class Net:\n    def f(self):\n        from flwr.app import Message\n",
    "secagg/__init__.py": "import torch\n",
    "secagg/p.py": "import numpy as np\nimport flwr\n",
    **{f"extra{i}.py": "" for i in range(8)},
}
EXPECTED = {
    ("no-cycles", "mmfed.a", 1), ("no-cycles", "mmfed.server.y", 4),
    ("roles-apart", "mmfed.site.x", 1), ("roles-apart", "mmfed.server.y", 4),
    ("allowed-imports", "mmfed.site.x", 1), ("allowed-imports", "mmfed.server.y", 4),
    ("allowed-imports", "mmfed.site.z", 2), ("allowed-imports", "mmfed.server.y", 6),
    ("banned-imports", "mmfed.config", 4), ("banned-imports", "mmfed.wire", 5),
    ("banned-imports", "mmfed.ml.m", 3), ("banned-imports", "mmfed.secagg", 1),
    ("banned-imports", "mmfed.secagg.p", 2),
    ("cheap-imports", "mmfed.site.app", 1), ("cheap-imports", "mmfed.wire", 1),
    ("top-level-modules", "mmfed", 0),
}


def test_checker_reports_every_broken_rule(tmp_path: Path) -> None:
    package = tmp_path / "mmfed"
    for name, text in BROKEN.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    found = violations(package)
    assert {(v.rule, v.module, v.line) for v in found} == EXPECTED, "\n".join(map(str, found))
    text = "\n".join(map(str, found))
    assert "import cycle mmfed.a -> mmfed.b -> mmfed.a" in text
    assert "mmfed.b line 2 imports mmfed.a" in text  # a late import still closes a cycle
    assert "mmfed.site.app line 1 -> mmfed.ml.heavy line 2 imports pandas" in text
    assert "mmfed.wire line 1 -> mmfed.ml.heavy line 2 imports pandas" in text
    assert "13 top-level modules" in text
    # and once every breach is repaired, nothing is reported
    for name in ("a.py", "b.py", "site/x.py", "site/z.py", "server/y.py", "ml/m.py",
                 "secagg/__init__.py", "secagg/p.py", "ml/heavy.py", "config.py", "wire.py"):
        (package / name).write_text("import numpy\n")
    for i in range(3):
        (package / f"extra{i}.py").unlink()
    assert violations(package) == []
