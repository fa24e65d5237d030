"""Level tagging: each prompt carries its mastery level (``knowledge_level``) to rollout, reward and
advantage, and the per-level step metrics.

Level of a sample (driver side, when the prompt is tagged): the table's level of its entity
(``extra_info["entity"]``, else the ground truth's ``<|object_ref_start|>`` marker), else
``extra_info["knowledge_level"]``, else ``karl.reward.default_level`` (counted in
``karl/level/defaulted``). Metrics every step: ``karl/level_k/{count, reward_mean, iou_mean, acc@0.5,
adv_mean, adv_abs_mean}``, ``karl/level/*`` and ``karl/reward/errors``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import transfer_queue as tq
from verl.utils import tensordict_utils as tu

from karl_verl.integration.estimator import NAME as KARL_ESTIMATOR
from karl_verl.integration.features.base import Rollouts, TrainerFeature, logger
from karl_verl.integration.tq_fields import row_field
from karl_verl.mastery import parse_level
from karl_verl.mastery_state import LEVEL_FIELD, LevelStats, sample_level


class LevelTagging(TrainerFeature):
    """Tags prompts with their level (from the mastery table), fetches the levels back, and counts per level."""

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        self.step_stats = LevelStats()
        self.counts: Counter[str] = Counter()
        if trainer.config.algorithm.adv_estimator != KARL_ESTIMATOR:
            logger.warning("karl: algorithm.adv_estimator=%s: mastery levels reach the reward but not the advantage "
                           "(set algorithm.adv_estimator=%s for mastery-weighted advantages)",
                           trainer.config.algorithm.adv_estimator, KARL_ESTIMATOR)

    def level(self, extra_info: Any, reward_model: Any) -> tuple[int, str | None, bool]:
        """(level, entity, known) of one sample: table, else ``extra_info["knowledge_level"]``, else default."""
        return sample_level(extra_info, reward_model, self.trainer.karl_state.table, self.trainer.karl_default_level)

    def levels(self, extra_infos: Sequence[Any], reward_models: Sequence[Any], *, count: bool) -> list[int]:
        levels = []
        for extra_info, reward_model in zip(extra_infos, reward_models, strict=True):
            level, entity, known = self.level(extra_info, reward_model)
            levels.append(level)
            if count and not known:
                self.counts["defaulted"] += 1
                if entity is None:
                    self.counts["no_entity"] += 1
                else:
                    self.trainer.karl_state.unknown_entities.add(entity)
        return levels

    def tag_prompts(self, batch: Any) -> None:
        size = len(batch)
        levels = self.levels(row_field(batch, "extra_info", size), row_field(batch, "reward_model", size), count=True)
        tu.assign_non_tensor_stack(batch, LEVEL_FIELD, levels)

    def tag_val_batch(self, batch_dict: dict) -> None:
        size = len(batch_dict["raw_prompt"])
        levels = self.levels(row_field(batch_dict, "extra_info", size), row_field(batch_dict, "reward_model", size),
                             count=False)
        batch_dict[LEVEL_FIELD] = np.array(levels, dtype=object)

    def fetch_levels(self, batch: Any) -> np.ndarray:
        """The levels of a TransferQueue batch: the travelling field, else recomputed from the table."""
        size = len(batch)
        try:
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[LEVEL_FIELD])
            raw = row_field(data, LEVEL_FIELD, size)
        except ValueError:
            # TransferQueue refuses a field that only some samples have: treat them all as untagged.
            raw = [None] * size
        missing = [i for i, value in enumerate(raw) if value is None]
        if missing:
            # A custom agent loop that drops prompt fields: fall back to the driver's current table.
            self.warn_once("missing_field", "karl: %d samples arrived without %r; their level comes from the "
                           "trainer's current table", len(missing), LEVEL_FIELD)
            self.counts["missing_field"] += len(missing)
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=["extra_info", "reward_model"])
            recomputed = self.levels(row_field(data, "extra_info", size), row_field(data, "reward_model", size),
                                     count=False)
            raw = [recomputed[i] if value is None else value for i, value in enumerate(raw)]
        return np.asarray([parse_level(value, where=f"{LEVEL_FIELD}[{i}]") for i, value in enumerate(raw)],
                          dtype=np.int64)

    def observe_rollouts(self, rollouts: Rollouts) -> None:
        """Per-level step statistics (padding rows left out) and the reward worker's level record."""
        valid, levels = rollouts.valid, rollouts.levels
        self.step_stats.add(levels[valid], rollouts.rewards[valid], rollouts.ious[valid], rollouts.accs[valid],
                            rollouts.advantages[valid])
        # The reward worker's own record of the level it scored with (the karl manager reports it):
        # a sample whose reward and advantage saw different levels would be a bug in the level's travel.
        scored = [info.get("knowledge_level") for info in rollouts.infos]
        self.counts["reward_level_seen"] += sum(1 for ok, lv in zip(valid, scored, strict=True)
                                                if ok and lv is not None)
        self.counts["reward_errors"] += sum(1 for ok, info in zip(valid, rollouts.infos, strict=True)
                                            if ok and info.get("reward_error"))
        self.counts["reward_level_mismatch"] += sum(
            1 for ok, lv, level in zip(valid, scored, levels, strict=True)
            if ok and lv is not None and int(lv) != int(level))

    def metrics(self) -> dict[str, float]:
        out = self.step_stats.metrics()
        for name in ("defaulted", "no_entity", "missing_field"):
            out[f"karl/level/{name}"] = float(self.counts[name])
        out["karl/level/unknown_entities"] = float(len(self.trainer.karl_state.unknown_entities))
        out["karl/level/reward_level_seen"] = float(self.counts["reward_level_seen"])
        out["karl/level/reward_level_mismatch"] = float(self.counts["reward_level_mismatch"])
        out["karl/reward/errors"] = float(self.counts["reward_errors"])
        self.step_stats = LevelStats()
        self.counts.clear()
        return out
