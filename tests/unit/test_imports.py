"""The package's shape: no import cycles between its modules (not even through an import inside
a function), and no module too long to read in one sitting."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hvd_trainer"
MAX_LINES = 350


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (a package is its __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports anywhere in its file. ``from P import x`` is an
    import of module ``P.x`` when there is one, else of ``P`` (a package: its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import pkg.sub\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.sub"}}
    assert find_cycle(graph) is None
    (pkg / "sub" / "__init__.py").write_text("def lazy():\n    from . import b\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == ["pkg.c", "pkg.sub", "pkg.sub.b"]


def test_no_import_cycles():
    graph = import_graph()
    assert "hvd_trainer.data.loaders" in graph and graph["hvd_trainer.data.sources"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_importing_the_data_package_or_its_checks_loads_no_torch():
    code = ("import sys, hvd_trainer.data, hvd_trainer.data.validation; "
            "print(sorted(m for m in ('torch', 'hvd_trainer.data.loaders', 'hvd_trainer.data.sources') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_module_fits_in_one_sitting():
    lines = {str(p.relative_to(PACKAGE.parent)): len(p.read_text(encoding="utf-8").splitlines())
             for p in modules().values()}
    over = {name: n for name, n in sorted(lines.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by concern): " + \
        ", ".join(f"{name} ({n})" for name, n in over.items())


STRATEGY_NAMES = {"horovod", "ddp", "ps", "single"}


def test_nothing_outside_strategies_asks_which_strategy_or_control_plane_it_has():
    """The loop and its components talk to the strategy's interface only: no comparison with a
    strategy's name and no isinstance on a strategy or control plane outside strategies/."""
    found = []
    for name, path in modules().items():
        if name.startswith("hvd_trainer.strategies"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in STRATEGY_NAMES]
                if consts:
                    found.append(f"{name}:{node.lineno} compares with {consts[0].value!r}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" and len(node.args) == 2:
                kinds = ast.unparse(node.args[1])
                if "Strategy" in kinds or "ControlPlane" in kinds or "CollectiveVote" in kinds:
                    found.append(f"{name}:{node.lineno} isinstance(..., {kinds})")
    assert not found, "\n".join(found)
