"""The import graph between the package's parts: no cycles, and no part imports the API or the CLI.

A part is a subpackage of `loraplex` that lives in its own directory (registry, router, continual,
generators, experts, and any added later, such as serve), or one top-level module of `loraplex/`
(data, models, heads, ...), which is a node of its own. `loraplex.api` and `loraplex.cli` are the
facade on top: they may import every part, and no part may import them. Every import counts, at
the top of a module or inside a function, except those under `if TYPE_CHECKING:` (never run).
The parts are read from pyproject's `[tool.setuptools.package-dir]`, so a new part is covered as
soon as it is installed.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACADE = ("loraplex.api", "loraplex.cli")


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """{dotted package: directory} from pyproject, e.g. {"loraplex.router": ROOT / "router"}."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    dirs = cfg["tool"]["setuptools"]["package-dir"]
    return {pkg: root / d for pkg, d in dirs.items()}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module: file} for every .py file of every package (subdirectories included)."""
    out: dict[str, Path] = {}
    for pkg, d in sorted(package_dirs(root).items(), key=lambda kv: len(kv[0])):
        for f in sorted(d.rglob("*.py")):
            rel = f.relative_to(d).with_suffix("").parts
            if "__pycache__" in rel:
                continue
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((pkg, *rel))] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(module: str, path: Path) -> set[str]:
    """Every module `module` imports (dotted, absolute), at any depth, TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def part_of(module: str) -> str | None:
    """The node a module belongs to: its subpackage (loraplex.router) or its own top-level module."""
    parts = module.split(".")
    if parts[0] != "loraplex":
        return None
    if len(parts) == 1:
        return "loraplex"
    if module.startswith(FACADE[1] + ".") or module in (FACADE[1], "loraplex.__main__"):
        return FACADE[1]  # `python -m loraplex` is the CLI
    return ".".join(parts[:2])


def part_graph(root: Path = ROOT) -> dict[str, dict[str, set[str]]]:
    """{part: {imported part: {"module -> imported", ...}}} for imports that cross parts."""
    known = modules(root)
    graph: dict[str, dict[str, set[str]]] = {}
    for mod, path in known.items():
        src = part_of(mod)
        graph.setdefault(src, {})
        for name in imported_names(mod, path):
            if name not in known:
                continue  # an attribute (`from pkg import Class`) or a third-party module
            dst = part_of(name)
            if dst and dst != src and dst != "loraplex":
                graph[src].setdefault(dst, set()).add(f"{mod} -> {name}")
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one part (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def describe(graph: dict[str, dict[str, set[str]]], comp: list[str]) -> str:
    return "; ".join(f"{sorted(graph[a][b])[0]}" for a in comp for b in comp if b in graph.get(a, {}))


def test_the_walk_sees_every_part():
    graph = part_graph()
    for part in ("loraplex.registry", "loraplex.router", "loraplex.continual", "loraplex.generators",
                 "loraplex.experts", "loraplex.api", "loraplex.cli", "loraplex.data"):
        assert part in graph, part
    assert "loraplex.continual.regularizers.gs_lora" in modules()
    # function-level imports count: router/load.py imports the experts only inside functions
    assert any("loraplex.router.load" in e for e in graph["loraplex.router"]["loraplex.experts"])


def test_no_cycle_between_parts():
    graph = part_graph()
    found = cycles(graph)
    assert not found, "import cycles between parts: " + " | ".join(
        f"{' <-> '.join(c)} ({describe(graph, c)})" for c in found)


@pytest.mark.parametrize("facade", FACADE)
def test_no_part_imports_the_api_or_the_cli(facade):
    graph = part_graph()
    bad = sorted(e for src, dsts in graph.items() if src not in FACADE for e in dsts.get(facade, ()))
    assert not bad, f"parts import {facade}: " + ", ".join(bad)


def test_the_check_fails_on_a_bad_import(tmp_path):
    """The walk itself can fail: a copy of the tree with one part importing the API back, and one
    function-level import closing a cycle."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"loraplex" = "loraplex"\n"loraplex.a" = "a"\n"loraplex.b" = "b"\n')
    for d in ("loraplex", "a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "loraplex" / "api.py").write_text("from loraplex.a import x\n")
    (tmp_path / "a" / "x.py").write_text("from . import y\nfrom loraplex.b import z\n")
    (tmp_path / "a" / "y.py").write_text("")
    (tmp_path / "b" / "z.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from loraplex import api\n"
        "def f():\n    from loraplex.a.y import g\n")
    graph = part_graph(tmp_path)
    assert cycles(graph) == [["loraplex.a", "loraplex.b"]]
    assert "loraplex.api" not in graph["loraplex.b"]  # TYPE_CHECKING only
    (tmp_path / "b" / "w.py").write_text("def f():\n    import loraplex.api\n")
    assert "loraplex.api" in part_graph(tmp_path)["loraplex.b"]


def documented_graph(doc: Path = ROOT / "docs" / "ARCHITECTURE.md") -> dict[str, set[str]]:
    """The import graph docs/ARCHITECTURE.md shows: the code block after "The graph today", a -> b, c."""
    text = doc.read_text()
    block = text[text.index("The graph today"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    out: dict[str, set[str]] = {}
    for line in block.strip().splitlines():
        src, _, dsts = line.partition("->")
        out[src.strip()] = {d.strip() for d in dsts.split(",") if d.strip()}
    return out


def test_the_architecture_doc_shows_the_graph_the_code_has():
    """The doc's graph went stale (serve missing, edges of cli and others missing): it is checked now."""
    short = lambda m: m.split(".", 1)[1] if "." in m else m  # noqa: E731
    code = {short(a): {short(b) for b in deps} for a, deps in part_graph().items() if deps}
    doc = documented_graph()
    assert doc == code, "docs/ARCHITECTURE.md's graph differs from the code's: " + "; ".join(
        f"{a}: doc {sorted(doc.get(a, set()) - code.get(a, set()))} not in code, code {sorted(code.get(a, set()) - doc.get(a, set()))} not in doc"
        for a in sorted(set(doc) | set(code)) if doc.get(a) != code.get(a))
