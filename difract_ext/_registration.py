"""Register our SAELens architectures whenever SAELens is imported.

SAELens keeps its architecture registry in a module-level dict and has no entry-point discovery,
so a process must run :func:`difract_ext.adapters.dictionaries.register_architectures` before
``SAE.load_from_disk`` can build our classes. Importing SAELens (and torch) eagerly from
``difract_ext/__init__`` would make every ``import difract_ext.<anything>`` slow and pull
libraries the core must not need, so instead:

- if ``sae_lens`` is already imported, register now;
- otherwise put a finder on ``sys.meta_path`` that lets Python import ``sae_lens`` as usual and
  registers right after the module has finished executing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

_TARGET = "sae_lens"
_ADAPTER = "difract_ext.adapters.dictionaries"


def _register() -> None:
    loading = sys.modules.get(_ADAPTER)
    if loading is not None and getattr(loading.__spec__, "_initializing", False):
        return  # SAELens was imported by the adapter itself, which registers when it finishes
    importlib.import_module(_ADAPTER).register_architectures()


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps SAELens' own loader; registers once its module has executed."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._inner, name)


class _SAELensFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the look-up below from recursing
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install_saelens_registration() -> None:
    """Register now if SAELens is loaded, else as soon as it is (idempotent)."""
    if _TARGET in sys.modules:
        _register()
        return
    if not any(isinstance(f, _SAELensFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SAELensFinder())
