"""Hydra search-path plugin: makes ``+recipe=karl_kvg`` (and the ablations) visible to verl's main_ppo.

Hydra imports every module under the ``hydra_plugins`` namespace package at start-up and calls
``manipulate_search_path`` before it composes anything. This plugin adds ``pkg://karl_verl.recipes``,
whose ``recipe/`` folder is the config group ``recipe``, and stores KARL's defaults in Hydra's
ConfigStore as the groups ``karl/reward`` (one option per preset), ``karl/mastery`` and
``karl/advantage``, built from the dataclasses of :mod:`karl_verl.config`, which the recipes select.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def store_karl_defaults() -> None:
    """Put :func:`karl_verl.config.hydra_default_nodes` into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from karl_verl.config import hydra_default_nodes

    store = ConfigStore.instance()
    for path, values in hydra_default_nodes().items():
        group, name = path.rsplit("/", 1)
        # Not struct: an unknown key given on the command line (karl.reward.tua=0.5) then reaches
        # karl-verl's own check, which names the closest known key, instead of Hydra's bare refusal.
        store.store(group=group, name=name, node=OmegaConf.create(values, flags={"struct": False}),
                    provider="karl-verl")


class KarlVerlSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="karl-verl", path="pkg://karl_verl.recipes")
        store_karl_defaults()
        # The recipes' ${karl_attention:...} keys resolve in this process too (--cfg job --resolve).
        from karl_verl.integration.resolvers import register_resolvers

        register_resolvers()
