"""Glue between the pure KARL method and verl 0.9: registrations into verl's own registries.

``register_all`` is the ``verl.plugins`` entry point (verl calls it in every process that
imports verl) and is also called by ``import karl_verl``. It only touches verl's registries,
which are per-process, and is idempotent: registering the same objects again is a no-op.
"""

from __future__ import annotations

import importlib

# Each module defines REGISTRY (what verl calls the registry), NAME, register() and is_registered().
_PARTS: tuple[str, ...] = (
    "karl_verl.integration.reward_manager",
    "karl_verl.integration.estimator",
    "karl_verl.integration.trainer",
)


def register_all() -> None:
    """Register every karl-verl part into verl (reward manager ``karl``, estimator ``karl_grpo``, ...)."""
    for module_name in _PARTS:
        importlib.import_module(module_name).register()


def registration_status() -> list[tuple[str, str, bool]]:
    """(registry, name, registered) for every part: whether verl's registry holds our object."""
    status = []
    for module_name in _PARTS:
        module = importlib.import_module(module_name)
        status.append((module.REGISTRY, module.NAME, module.is_registered()))
    return status
