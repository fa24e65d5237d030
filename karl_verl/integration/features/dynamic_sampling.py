"""Dynamic sampling's trainer hooks (``algorithm.filter_groups.enable``): verl's replay buffer made a
:class:`~karl_verl.integration.dynamic_sampling.KarlReplayBuffer`, the outcomes of dropped groups
counted like trained ones, and ``karl/filter/*`` every step (see :mod:`karl_verl.integration.dynamic_sampling`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from karl_verl.integration.dynamic_sampling import (
    HeldBudgetWarning,
    KarlReplayBuffer,
    constant_groups,
    filter_metric,
    filter_metrics,
    row_metric_values,
)
from karl_verl.integration.features.base import Rollouts, TrainerFeature, logger, reward_infos
from karl_verl.integration.tq_fields import row_field
from karl_verl.mastery_state import LEVEL_FIELD, finite_or_none


class DynamicSampling(TrainerFeature):
    """The group filter's replay buffer, dropped-group outcomes, refills per level and ``karl/filter/*``."""

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        self.metric = filter_metric(trainer.config)
        #: Prompts generated to replace groups the filter dropped, per level.
        self.refilled: Counter[int] = Counter()
        self.trained_constant_groups = 0

    @classmethod
    def enabled(cls, trainer: Any) -> bool:
        return bool(filter_metric(trainer.config))

    def build_replay_buffer(self, build: Callable[[], Any]) -> Any | None:
        """verl's replay buffer made the one that counts dropped groups per level and honours
        ``algorithm.filter_groups.max_num_gen_batches``."""
        from verl.trainer.ppo.v1 import trainer_base

        held = HeldBudgetWarning()
        trainer_base.logger.addFilter(held)
        try:
            buffer = build()
        finally:
            trainer_base.logger.removeFilter(held)
        if self.trainer.trainer_mode == "sync" and type(buffer) is ReplayBuffer:
            budget = int(self.trainer.config.algorithm.filter_groups.get("max_num_gen_batches", 0) or 0)
            if budget > 0:
                logger.warning("karl: algorithm.filter_groups.max_num_gen_batches=%d is honoured: dynamic sampling "
                               "stops filtering within a step after %d prompt batches (verl's own v1 trainer "
                               "would ignore it)", budget, budget)
            buffer = KarlReplayBuffer.specialise(buffer, max_gen_batches=budget)
            buffer.karl_observe_dropped = self.observe_dropped
        else:
            held.release(trainer_base.logger)
        return buffer

    def observe_dropped(self, partition_id: str, keys: list[str]) -> None:
        """The outcomes of groups the filter drops, counted like trained ones.

        Without this the online mastery estimate and the curriculum's band-pass would only see the
        groups the filter keeps (mixed ones): an entity that always fails would never be counted as
        failing. Nothing reaches the per-step training statistics (these rows are not trained on).
        """
        if not any(feature.wants_outcomes for feature in self.trainer.karl_features):
            return
        data = tq.kv_batch_get(keys=keys, partition_id=partition_id,
                               select_fields=["extra_fields", "extra_info", "reward_model"])
        size = len(keys)
        accs = [finite_or_none(info.get("acc")) for info in reward_infos(data, size)]
        self.trainer.karl_dispatch("observe_outcomes", row_field(data, "extra_info", size),
                                   row_field(data, "reward_model", size), np.ones(size, dtype=bool), accs)

    def observe_refill(self, batch: Any) -> None:
        self.refilled.update(int(level) for level in row_field(batch, LEVEL_FIELD, len(batch)))

    def observe_rollouts(self, rollouts: Rollouts) -> None:
        values = row_metric_values(self.metric, rollouts.infos, rollouts.rewards)
        self.trained_constant_groups += constant_groups(rollouts.batch.keys, values, rollouts.valid)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        buffer = self.trainer.replay_buffer
        if isinstance(buffer, KarlReplayBuffer):
            dropped, exhausted = buffer.karl_take_dropped()
            out = filter_metrics(self.metric, dropped, self.refilled, exhausted, self.trained_constant_groups)
        self.refilled = Counter()
        self.trained_constant_groups = 0
        return out
