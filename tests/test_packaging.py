"""The installed package and the README's Quick start demo."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_start_demo_prints_squares():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "square.py")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str([x * x for x in range(10)])


@pytest.mark.parametrize("script", ["cw-master", "cw-worker"])
def test_console_scripts_are_installed(script):
    try:
        metadata.distribution("cw")
    except metadata.PackageNotFoundError:
        pytest.skip("cw is not installed (pip install .)")
    path = shutil.which(script)
    assert path, f"{script} not on PATH after pip install"
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--log-level" in out.stdout


def test_cw_imports_no_private_names_of_the_standard_library():
    """Private helpers come and go between CPython versions (3.13 removed
    concurrent.futures.process._get_chunks, which cw once imported)."""
    offences = []
    for path in sorted((ROOT / "cw").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                modules, names = [alias.name for alias in node.names], []
            else:
                continue
            for module in modules:
                if module.split(".")[0] not in sys.stdlib_module_names:
                    continue
                private = [p for p in [*module.split("."), *names]
                           if p.startswith("_") and not p.startswith("__")]
                if private:
                    offences.append(f"{path.name}:{node.lineno}: {module} {private}")
    assert not offences, offences


def test_classifiers_list_the_tested_pythons():
    """setup.py lists the CPython versions .ci/run tests: this one and pyenv's >= 3.10."""
    listed = set(re.findall(r"Programming Language :: Python :: (3\.\d+)\"",
                            (ROOT / "setup.py").read_text()))
    tested = {"%d.%d" % sys.version_info[:2]}
    if shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        tested |= {m.group(1) for p in Path(root, "versions").glob("3.*")
                   if (m := re.match(r"(3\.\d+)\.", p.name)) and int(m.group(1)[2:]) >= 10}
    assert tested <= listed, f"tested {sorted(tested)}, listed {sorted(listed)}"
