"""Glue between the pure KARL method and verl 0.9: registrations into verl's own registries.

What registers the parts: ``karl_verl/__init__.py`` calls :func:`register_when_verl_loads`, which
runs :func:`register_all` at once when verl is already imported (or being imported), else right
after verl's own import finishes. The ``verl.plugins`` entry point names ``register_all``, but verl
0.9.1 only *loads* entry points (``entry_point.load()`` at the end of ``import verl``, in every
process that imports verl, its exceptions swallowed): it never calls them. Loading it imports this
module, hence the ``karl_verl`` package first, and that import is what registers. So importing
karl-verl's pure modules or its command line costs no verl, torch or Ray import, and every verl
process (driver, TaskRunner, reward workers) gets the parts. ``register_all`` only touches verl's
registries, which are per-process, and is idempotent: registering again is a no-op.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

# Each module defines REGISTRY (what verl calls the registry), NAME, register() and is_registered().
_PARTS: tuple[str, ...] = (
    "karl_verl.integration.reward_manager",
    "karl_verl.integration.estimator",
    "karl_verl.integration.trainer",
    "karl_verl.integration.inject_agent_loop",
)


def register_all() -> None:
    """Register every karl-verl part into verl (reward manager ``karl``, estimator ``karl_grpo``, ...)."""
    # This imports verl itself; a pending hook would re-enter here from inside that import.
    _remove_hooks()
    from karl_verl.cpu import is_active as cpu_layer_active

    if cpu_layer_active():
        # A CPU run: verl's platform must be "cpu" before any verl module below resolves it.
        importlib.import_module("karl_verl.cpu.plugin")
    for module_name in _PARTS:
        module = importlib.import_module(module_name)
        # A part whose own import started verl's (and so this call) is only half there: it
        # registers itself on its last line, once its import finishes.
        if not getattr(module.__spec__, "_initializing", False):
            module.register()


def registration_status() -> list[tuple[str, str, bool]]:
    """(registry, name, registered) for every part: whether verl's registry holds our object."""
    status = []
    for module_name in _PARTS:
        module = importlib.import_module(module_name)
        status.append((module.REGISTRY, module.NAME, module.is_registered()))
    return status


class _RegisteringLoader(importlib.abc.Loader):
    """Runs verl's real loader, then :func:`register_all`; hands the module its real loader back."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
        register_all()

    def __getattr__(self, name: str) -> Any:  # resource readers and the like go to the real loader
        return getattr(self._loader, name)


class _VerlImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder for the top-level ``verl`` package: wraps its loader, then leaves sys.meta_path.

    Registration must also happen when verl's entry-point loading is off
    (``VERL_USE_EXTERNAL_PLUGINS=none``) or karl-verl runs from a source tree without its metadata,
    for code that did ``import karl_verl`` first.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "verl":
            return None
        _remove_hooks()
        spec = importlib.util.find_spec(fullname)  # the real finders: this hook is gone from sys.meta_path
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _remove_hooks() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _VerlImportHook)]


def register_when_verl_loads() -> None:
    """Register now if verl is imported (or being imported), else right after its import finishes."""
    if "verl" in sys.modules:
        register_all()
    elif not any(isinstance(finder, _VerlImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _VerlImportHook())
