"""The installed package and the README's Quick start demo."""
from __future__ import annotations

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
