"""The ``karl`` trainer's features, one module each; :class:`~karl_verl.integration.trainer.KarlTrainer`
hands every verl hook to them in the order of :data:`FEATURES`.

A new feature is a module with a :class:`TrainerFeature` subclass plus one line in :data:`FEATURES`.
The order matters where features depend on each other: the mastery state is loaded before the
curriculum's (whose levels come from the table), levels are tagged before the injection plan. iVGR's
stream expansion is a hook of its own (``expand_prompts``) that runs before every feature's
``tag_prompts``, so all of them see both streams' rows whatever the order; iVGR comes last so that its
``before_advantage`` and metrics follow the others' (no other feature uses that hook yet).
"""

from __future__ import annotations

from typing import Any

from karl_verl.integration.features.base import Rollouts, TrainerFeature
from karl_verl.integration.features.curriculum import Curriculum
from karl_verl.integration.features.dynamic_sampling import DynamicSampling
from karl_verl.integration.features.injection import Injection
from karl_verl.integration.features.ivgr import Ivgr
from karl_verl.integration.features.levels import LevelTagging
from karl_verl.integration.features.mastery import MasteryRefresh

#: Every feature, in dispatch order.
FEATURES: tuple[type[TrainerFeature], ...] = (
    MasteryRefresh,
    LevelTagging,
    DynamicSampling,
    Curriculum,
    Injection,
    Ivgr,
)


def build_features(trainer: Any) -> list[TrainerFeature]:
    """The features this trainer's configuration enables, built in :data:`FEATURES` order."""
    return [feature(trainer) for feature in FEATURES if feature.enabled(trainer)]


__all__ = ["FEATURES", "Curriculum", "DynamicSampling", "Injection", "Ivgr", "LevelTagging", "MasteryRefresh",
           "Rollouts", "TrainerFeature", "build_features"]
