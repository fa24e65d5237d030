"""Knowledge-infused rollouts' trainer hooks (``karl.inject.enable``): the actors' loss with the
off-policy term, each prompt's injection plan, rollout log-probs of injected rows, on-policy group
statistics and ``karl/inject/*`` (see :mod:`karl_verl.integration.inject`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from verl.utils.config import omega_conf_to_dataclass

from karl_verl.integration.features.base import Rollouts, TrainerFeature
from karl_verl.integration.tq_fields import row_field
from karl_verl.mastery_state import LEVEL_FIELD


class Injection(TrainerFeature):
    """Drives :class:`~karl_verl.integration.inject.InjectionDriver` from the trainer's hooks."""

    def __init__(self, trainer: Any) -> None:
        from karl_verl.integration.inject import InjectionDriver

        super().__init__(trainer)
        self.driver = InjectionDriver.create(trainer.karl_config.inject, trainer.config,
                                             getattr(trainer, "tokenizer", None), getattr(trainer, "processor", None))

    @classmethod
    def enabled(cls, trainer: Any) -> bool:
        return bool(trainer.karl_config.inject.enable)

    def on_setup(self) -> None:
        actor_config = omega_conf_to_dataclass(self.trainer.config.actor_rollout_ref.actor)
        self.trainer.actor_rollout_wg.set_loss_fn(self.driver.loss_fn(actor_config))

    def tag_prompts(self, batch: Any) -> None:
        """After the levels (registered after :class:`LevelTagging`): the plan depends on them."""
        size = len(batch)
        levels = [int(level) for level in row_field(batch, LEVEL_FIELD, size)]
        self.driver.tag(batch, levels, row_field(batch, "extra_info", size))

    def after_old_log_prob(self, batch: Any, metrics: dict) -> None:
        if self.trainer.config.actor_rollout_ref.rollout.calculate_log_probs:
            self.driver.align_rollout_log_probs(batch, metrics)

    def on_policy_rows(self, batch: Any) -> np.ndarray | None:
        return self.driver.on_policy_rows(batch)

    def observe_rollouts(self, rollouts: Rollouts) -> None:
        self.driver.observe(rollouts.batch, rollouts.levels)

    def metrics(self) -> dict[str, float]:
        return self.driver.consume_metrics()
