"""Glue between the pure KARL method and verl 0.9: registrations into verl's own registries.

What registers the parts: ``karl_verl/__init__.py`` calls :func:`register_when_verl_loads`. Each part
registers into one verl registry, and it is imported and registered when the verl module that holds
that registry has been imported (at once, where it already is): the trainer when
``verl.trainer.ppo.v1`` is, the reward manager with ``verl.experimental.reward_loop.reward_manager``,
the estimator with ``verl.trainer.ppo.core_algos``, the inject agent loop with
``verl.experimental.agent_loop``. A process that never looks a part up never imports it: a vLLM
worker or a reward worker does not import the trainer, TransferQueue's client or the agent loop
because it imported verl (measured by ``tests/integration/test_registration.py``: ``import verl``
costs the modules it costs without karl-verl, plus karl-verl's light package modules).

The ``verl.plugins`` entry point names ``register_all``, but verl 0.9.1 only *loads* entry points
(``entry_point.load()`` at the end of ``import verl``, in every process that imports verl, its
exceptions swallowed): it never calls them. Loading it imports this module, hence the ``karl_verl``
package first, and that import is what installs the hooks. ``register_all`` registers everything
now (``karl-verl info``, tests); registering is per process and idempotent.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from karl_verl.integration import resolvers, weight_sync

#: Each part (a module defining REGISTRY, NAME, register() and is_registered()) and the verl package
#: whose import makes it register: a package, so that every module it imports is complete by then.
_PARTS: dict[str, str] = {
    "karl_verl.integration.reward_manager": "verl.experimental.reward_loop.reward_manager",
    "karl_verl.integration.estimator": "verl.trainer.ppo.core_algos",
    "karl_verl.integration.trainer": "verl.trainer.ppo.v1",
    "karl_verl.integration.inject_agent_loop": "verl.experimental.agent_loop",
}


_TRAINER_HOST = "verl.trainer.ppo.v1"


def _verl_imported() -> None:
    """verl itself is imported: what must be in place before any verl module reads its config or platform."""
    # verl's processes resolve the run's config (the recipes' ${karl_attention:...}) after importing verl.
    resolvers.register_resolvers()
    _cpu_layer_first()


def _cpu_layer_first() -> None:
    from karl_verl.cpu import is_active as cpu_layer_active

    if cpu_layer_active():
        # A CPU run: verl's platform must be "cpu" before any verl module below resolves it.
        importlib.import_module("karl_verl.cpu.plugin")


def _register_part(module_name: str) -> None:
    module = importlib.import_module(module_name)
    # A part whose own import started its host's (and so this call) is only half there: it
    # registers itself on its last line, once its import finishes.
    if not getattr(module.__spec__, "_initializing", False):
        module.register()


def register_all() -> None:
    """Register every karl-verl part into verl now (reward manager ``karl``, estimator ``karl_grpo``, ...)."""
    _remove_hooks()
    _verl_imported()
    weight_sync.install()
    for module_name in _PARTS:
        _register_part(module_name)
    _cpu_trainer_patches()


def _host_loaded(host: str) -> None:
    """``host`` finished importing: register the parts it holds the registry of."""
    _verl_imported()
    for module_name, part_host in _PARTS.items():
        if part_host == host:
            _register_part(module_name)
    if host == _TRAINER_HOST:
        _cpu_trainer_patches()


def _cpu_trainer_patches() -> None:
    """In a CPU run, the patch for the process that holds verl's trainer (whichever trainer it is)."""
    from karl_verl.cpu import is_active as cpu_layer_active

    if cpu_layer_active():
        from karl_verl.cpu.patches import install_replay_poll_interval

        install_replay_poll_interval()


def registration_status() -> list[tuple[str, str, bool]]:
    """(registry, name, registered) for every part: whether verl's registry holds our object."""
    status = []
    for module_name in _PARTS:
        module = importlib.import_module(module_name)
        status.append((module.REGISTRY, module.NAME, module.is_registered()))
    return status


class _RegisteringLoader(importlib.abc.Loader):
    """Runs verl's real loader for a host module, then registers its parts; hands the module its real loader back."""

    def __init__(self, loader: Any, host: str) -> None:
        self._loader = loader
        self._host = host

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
        _host_loaded(self._host)

    def __getattr__(self, name: str) -> Any:  # resource readers and the like go to the real loader
        return getattr(self._loader, name)


class _VerlImportHook(importlib.abc.MetaPathFinder):
    """Finder for the verl packages that hold the registries: wraps each one's loader once.

    Registration must also happen when verl's entry-point loading is off
    (``VERL_USE_EXTERNAL_PLUGINS=none``) or karl-verl runs from a source tree without its metadata,
    for code that did ``import karl_verl`` first. The hook leaves ``sys.meta_path`` once every host
    has been seen.
    """

    def __init__(self, hosts: set[str]) -> None:
        self.hosts = hosts

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.hosts:
            return None
        self.hosts.discard(fullname)
        if not self.hosts:
            _remove_hooks()
        # The real finders: this hook no longer answers for ``fullname``.
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader, fullname)
        return spec


def _remove_hooks() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _VerlImportHook)]


def register_when_verl_loads() -> None:
    """Register each part when (or, if it already is, now that) the verl package holding its registry is imported.

    The CPU execution layer (CPU runs only) goes in as soon as verl itself is imported: verl modules
    resolve the platform at import time.
    """
    if any(isinstance(finder, _VerlImportHook) for finder in sys.meta_path):
        return
    weight_sync.install()  # waits for verl's vLLM weight sender to be imported, if it ever is
    pending = set()
    if "verl" in sys.modules:
        _verl_imported()
    else:
        pending.add("verl")
    for host in dict.fromkeys(_PARTS.values()):
        module = sys.modules.get(host)
        if module is None:
            pending.add(host)
        elif not getattr(module.__spec__, "_initializing", False):
            _host_loaded(host)
        # A host half-imported here is one whose own import chain imported karl_verl (a part's
        # module imports its host): that part registers itself on its last line.
    if pending:
        sys.meta_path.insert(0, _VerlImportHook(pending))
