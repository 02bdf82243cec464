"""The package's shape (issue 13): roles as packages, small modules, no import cycles through
them, one meaning per name, loggers named after their modules. Static checks of the source,
so a move that breaks them fails here, in a second, before any process starts."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CW = ROOT / "cw"
ROLES = ("conn", "master", "worker", "client", "launch")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the cw package."""
    found = {}
    for path in sorted(CW.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """Every cw module ``path`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == "cw" or m.startswith("cw.")}


BASE = {"cw.errors", "cw.protocol", "cw.serialize", "cw.defaults", "cw.cli", "cw.moved",
        "cw.resources"}


def role(module: str) -> str:
    """A module's layer: a role package, the shared base, or a tool on top (cw.status)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ROLES:
        return parts[1]
    return "base" if module in BASE else "tools"


def test_each_role_is_a_package_runnable_where_the_readme_says():
    for name in ROLES:
        assert (CW / name / "__init__.py").is_file(), name
    for module in ("cw.master", "cw.worker", "cw.status", "cw.ssh", "cw.mp", "cw.slurm"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0 and "usage" in done.stdout, (module, done.stderr)


def test_no_module_is_over_400_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}


def test_the_wire_code_imports_no_role_and_no_role_imports_another_in_a_cycle():
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        if name == "cw":
            continue  # the public face imports every role; nothing in cw imports it
        graph.setdefault(role(name), set()).update(
            role(m) for m in imports(path, name) if m in known and m != "cw")
    for r in graph:
        graph[r].discard(r)
    assert graph.get("base", set()) == set(), graph["base"]
    assert graph.get("conn", set()) <= {"base"}, graph["conn"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False
    cycles = [r for r in graph if reaches(r, r, {r})]
    assert not cycles, graph


def test_cw_imports_only_the_new_names_of_moved_modules():
    """cw.moved keeps old names working for users' scripts; cw itself must not lean on it."""
    from cw.moved import MOVED
    offences = [f"{n}: {m}" for n, p in modules().items() for m in imports(p, n)
                if any(m == old or m.startswith(old + ".") for old in MOVED)]
    assert not offences


@pytest.mark.parametrize("old, new", [("cw.mp", "cw.launch.local"),
                                      ("cw.slurm", "cw.launch.slurm"),
                                      ("cw.address", "cw.conn.address")])
def test_old_module_names_are_the_new_modules(old, new):
    import importlib
    assert importlib.import_module(old) is importlib.import_module(new)


def test_one_class_per_name_and_loggers_named_after_their_module():
    classes: dict[str, list[str]] = {}
    loggers = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(name)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "getLogger" \
                    and node.args and isinstance(node.args[0], ast.Constant):
                loggers.append(f"{name}: {node.args[0].value}")
    assert not {c: ms for c, ms in classes.items() if len(ms) > 1}
    assert not loggers  # a literal logger name: use __name__
