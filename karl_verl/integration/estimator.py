"""Registers :func:`karl_verl.advantage.compute_karl_grpo_advantage` as verl's ``karl_grpo``."""

from __future__ import annotations

from karl_verl.advantage import compute_karl_grpo_advantage

REGISTRY = "advantage estimator (verl.trainer.ppo.core_algos)"
NAME = "karl_grpo"


def register() -> None:
    from verl.trainer.ppo.core_algos import register_adv_est

    # verl's registry accepts the same function object again, so repeated imports are harmless.
    register_adv_est(NAME)(compute_karl_grpo_advantage)


def is_registered() -> bool:
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

    return ADV_ESTIMATOR_REGISTRY.get(NAME) is compute_karl_grpo_advantage


# Importing this module registers it, as verl's own decorators do (a dict entry, nothing more):
# so a part imported on its own, before verl, is registered too (see register_all).
register()
