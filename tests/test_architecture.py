"""The house rules of docs/architecture.md, checked: layers (import-linter, configured in
pyproject.toml), no import cycle, no source file past 600 lines, every package shipped."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"mlfd": ROOT / "mlfd", "mlfd_cli": ROOT / "mlfd_cli", "mlfd_kernels": ROOT / "kernels"}
MAX_LINES = 600


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(pythonpath or "")}
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                          cwd=cwd, capture_output=True, text=True, env=env)


def test_the_layer_contracts_hold():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    # The same sources with one import against the grain: mlfd.data reaching up into the
    # stages. import-linter must refuse it, naming the import.
    for name, src in SOURCES.items():
        shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    init = tmp_path / "mlfd" / "data" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom mlfd.stages import common  # noqa: E402,F401\n")
    proc = _lint_imports(tmp_path, pythonpath=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 1 broken." in proc.stdout
    assert "mlfd.data -> mlfd.stages.common" in proc.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(
                        child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    g = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        g.add_import(importer=a, imported=b)
    assert _cycles(g) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycle_anywhere():
    graph = grimp.build_graph("mlfd", "mlfd_cli", "mlfd_kernels", cache_dir=None)
    assert _cycles(graph) == []


def test_no_source_file_is_too_long_to_hold_in_mind():
    long = {str(p.relative_to(ROOT)): n for src in SOURCES.values() for p in src.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_package_is_shipped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(config["packages"])
    found = {".".join((name, *p.parent.relative_to(src).parts))
             for name, src in SOURCES.items() for p in src.rglob("__init__.py")}
    assert found - shipped == set()
