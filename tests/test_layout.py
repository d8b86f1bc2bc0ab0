"""The codebase's shape: no import cycles (imports inside functions count), short functions, a
torch-free face, and a README and docs that stand on their own."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "edgeclr"


def import_graph() -> dict[str, set[str]]:
    """{module: edgeclr modules it imports}, counting imports anywhere in the file (inside functions
    too) and modules named in strings, the way a module is loaded by name (importlib.import_module(
    "edgeclr.x"), a "edgeclr.x:function" table entry). The package face (edgeclr/__init__.py) is left out."""
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.partition(":")[0] in mods:
                # a module named in a string ("edgeclr.x", "edgeclr.x:function"): loaded by name somewhere
                targets = [node.value.partition(":")[0]]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else subs + [base]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t != "edgeclr" and m != "edgeclr":
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_edgeclr_modules():
    graph = import_graph()
    assert len(graph) > 20 and sum(map(len, graph.values())) > 50  # the scan sees the package
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_an_import_inside_a_function():
    g = {"edgeclr.a": {"edgeclr.b"}, "edgeclr.b": {"edgeclr.c"}, "edgeclr.c": {"edgeclr.a"}, "edgeclr.d": {"edgeclr.a"}}
    assert cycles(g) == [["edgeclr.a", "edgeclr.b", "edgeclr.c"]]


def test_the_cycle_check_counts_a_module_loaded_by_name(tmp_path, monkeypatch):
    pkg = tmp_path / "edgeclr"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import edgeclr.b\n")
    (pkg / "b.py").write_text("import importlib\n\n\ndef f():\n    return importlib.import_module('edgeclr.a')\n")
    (pkg / "c.py").write_text("import edgeclr.d\n")
    (pkg / "d.py").write_text("TABLE = {'x': 'edgeclr.c:main'}\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PKG", pkg)
    assert sorted(cycles(import_graph())) == [["edgeclr.a", "edgeclr.b"], ["edgeclr.c", "edgeclr.d"]]


def test_the_torch_free_modules_import_with_torch_blocked():
    """The device path, the CLI's start, the API's face and the report: no torch (a board has none)."""
    mods = ["edgeclr", "edgeclr.api", "edgeclr.cli", "edgeclr.errors", "edgeclr.stages", "edgeclr.formats", "edgeclr.config",
            "edgeclr.rundir", "edgeclr.report", "edgeclr.bench", "edgeclr.runtime", "edgeclr.tasks"]
    code = "import sys; sys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in mods)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_function_in_edgeclr_is_longer_than_80_lines_and_compress_main_is_under_50():
    long = []
    for p in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                long.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []
    main = next(n for n in ast.parse((PKG / "compress" / "__init__.py").read_text()).body
                if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 < 50


def test_readme_is_a_users_document_that_points_nowhere_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "# 2. run the tests" in readme  # .ci/run runs the line after it
    for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *PKG.rglob("*.py")]:
        text = p.read_text()
        assert "../shared" not in text and "FIELD-NOTES" not in text and "DESIGN.md" not in text, p
    assert not re.search(r"\b[0-9a-f]{7,40}\b(?=[^|]*\bcommit)|fresh clone of [0-9a-f]{7}", readme)  # no commit hashes


def test_every_relative_link_in_readme_and_docs_exists():
    for p in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", p.read_text()):
            if "://" not in target:
                assert (p.parent / target).exists(), f"{p.relative_to(ROOT)} links to {target}, which does not exist"
