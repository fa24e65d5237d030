"""Hydra search-path plugin: makes ``+recipe=karl_kvg`` (and the ablations) visible to verl's main_ppo.

Hydra imports every module under the ``hydra_plugins`` namespace package at start-up; this one
adds ``pkg://karl_verl.recipes``, whose ``recipe/`` folder is the config group ``recipe``.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class KarlVerlSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="karl-verl", path="pkg://karl_verl.recipes")
