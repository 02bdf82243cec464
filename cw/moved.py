"""Old module names, kept working: ``import cw.mp`` is ``cw.launch.local``, and so on.

cw's modules moved into packages by role (cw.conn, cw.master, cw.worker, cw.client,
cw.launch). Scripts that import the old flat names still work: a finder on ``sys.meta_path``
answers for each old name with the module at its new home (the same module object, so
state and monkeypatching are shared), and ``python -m cw.ssh`` runs the new module as
``__main__``. The launchers' names (``cw.mp``, ``cw.slurm``, ``cw.ssh``) and the clients'
add-ons (``cw.progress``, ``cw.joblib``) are public and stay; the others are internal.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

MOVED = {
    "cw.mp": "cw.launch.local",
    "cw.slurm": "cw.launch.slurm",
    "cw.ssh": "cw.launch.ssh",
    "cw.progress": "cw.client.progress",
    "cw.joblib": "cw.client.joblib",
    "cw.session": "cw.client.session",
    "cw.address": "cw.conn.address",
    "cw.security": "cw.conn.security",
    "cw.local": "cw.conn.local",
    "cw.peer": "cw.conn.peer",
    "cw.zloop": "cw.conn.zloop",
    "cw.lane": "cw.conn.lane",
    "cw.scheduler": "cw.master.scheduler",
    "cw.dashboard": "cw.master.dashboard",
    "cw.throughput": "cw.master.throughput",
}


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new home."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec, self.loader = module.__spec__, module.__loader__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the new module ran when it was imported); importlib wrote the
        alias's spec on it: give it back its own."""
        module.__spec__, module.__loader__ = self.spec, self.loader

    def get_code(self, fullname: str) -> CodeType | None:
        """For ``python -m <old name>`` (runpy runs this code as ``__main__``)."""
        spec = importlib.util.find_spec(self.target)
        loader = spec.loader if spec else None
        get_code = getattr(loader, "get_code", None)
        return get_code(self.target) if get_code else None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Answer for the old names (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
