"""``import gradsel`` is ``import gradsel_core``: the distribution is named gradsel, the code lives in
``gradsel_core``. After ``import gradsel``, ``gradsel is gradsel_core``, and every submodule is reachable
under both names as one module object: ``import gradsel.models`` gives ``gradsel_core.models`` itself (so
classes, registries and ``isinstance`` checks are shared, never duplicated).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

import gradsel_core

_ALIAS, _TARGET = "gradsel", "gradsel_core"


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already imported ``gradsel_core.<name>`` module instead of creating a new one."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # the target module is executed by its own import
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Maps ``gradsel.X.Y`` to ``gradsel_core.X.Y`` for every submodule that exists in gradsel_core."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_ALIAS + "."):
            return None
        real = _TARGET + fullname[len(_ALIAS):]
        if real not in sys.modules and importlib.util.find_spec(real) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
sys.modules[_ALIAS] = gradsel_core
