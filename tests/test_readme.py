"""Every Python example in README.rst runs, against a real cluster.

The examples name the master as a user would ("localhost", port 5494); the test points
them at its own master on a free port by rewriting that address, and runs each block in a
fresh interpreter.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[tuple[int, str]]:
    text = (ROOT / "README.rst").read_text()
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text, re.M):
        line = text[:match.start()].count("\n") + 1
        blocks.append((line, textwrap.dedent(match.group(1))))
    return blocks


BLOCKS = python_blocks()


def test_readme_has_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.timeout(120)
@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
def test_readme_example_runs(cluster, tmp_path, line, code):
    code = (code.replace('"localhost", 5494', f'"{cluster.host}", {cluster.port}')
                .replace('host="localhost", port=5494',
                         f'host="{cluster.host}", port={cluster.port}')
                .replace('"localhost"', f'"{cluster.host}:{cluster.port}"'))
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=110, cwd=tmp_path)
    assert out.returncode == 0, f"README line {line}:\n{code}\n{out.stderr}"
