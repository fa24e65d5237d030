"""The ``karl`` trainer: verl's v1 sync trainer plus KARL's knowledge-mastery bookkeeping.

Select it with ``trainer.v1.trainer_mode=karl`` (the ``karl_kvg`` recipe does). What runs where:

* :class:`KarlTrainer` runs in verl's TaskRunner (a Ray actor, CPU): the driver of training. It
  overrides verl's hooks and hands each to its features (:mod:`karl_verl.integration.features`, one
  module each, in the order of ``FEATURES``): mastery refresh (the table
  (:class:`~karl_verl.mastery_state.MasteryState`), loaded or probed at train begin, refreshed on the
  schedule of ``karl.mastery.refresh_every_*``, swapped as a whole, saved with every checkpoint and
  restored on resume), level tagging, dynamic sampling, the prompt curriculum and injection. The
  ``karl_grpo`` advantage step stays here (:meth:`KarlTrainer._karl_compute_advantage`).
* Each sample's level travels with the sample. Before a prompt is handed to the agent loop, the
  trainer puts the non-tensor field ``knowledge_level`` (int 1..5) on it. verl copies every prompt
  field into each of the ``n`` rollouts (agent-loop workers, any node), into the one-row DataProto
  the reward-loop worker scores (``non_tensor_batch["knowledge_level"]``, read first by the ``karl``
  reward manager), and into the trajectory's TransferQueue record, from which
  :meth:`KarlTrainer._compute_advantage` fetches it for ``karl_grpo``. Nothing depends on module
  globals or on a file only the driver can read; and the reward and the advantage of a sample see
  the same level even if the table is swapped between its rollout and its update.
* A refresh probes on the same rollout servers as training rollouts (vLLM replicas on the training
  GPUs, awake at the step boundary where the refresh happens), through
  :class:`~karl_verl.integration.rollout_probe.RolloutProbeBackend`: no second copy of the model.
  A refresh that raises, times out (``probe_timeout_s``) or comes back short keeps the previous
  table, and is logged as a warning and as the metric ``karl/refresh/failed``.

Level of a sample (driver side, when the prompt is tagged): the table's level of its entity
(``extra_info["entity"]``, else the ground truth's ``<|object_ref_start|>`` marker), else
``extra_info["knowledge_level"]``, else ``karl.reward.default_level`` (counted in
``karl/level/defaulted``).

Metrics (verl's logger: console, wandb, ...): every step ``karl/level_k/{count, reward_mean,
iou_mean, acc@0.5, adv_mean, adv_abs_mean}`` and ``karl/level/reward_level_mismatch`` (samples whose
reward worker scored them at another level than the one the advantage used; always 0) and
``karl/reward/errors`` (samples whose scoring raised and scored as a miss); at each refresh
``karl/refresh/*`` and ``karl/mastery/level_k/*`` (see :mod:`karl_verl.mastery_state`). With
dynamic sampling (``algorithm.filter_groups.enable``) every step also ``karl/filter/*``: groups
dropped and prompts refilled per level (see :mod:`karl_verl.integration.dynamic_sampling`). With
``karl.inject.enable``, ``karl/inject/*`` (knowledge-infused rollouts, :mod:`karl_verl.integration.inject`).
With the prompt curriculum (``karl.curriculum.enable``) ``karl/curriculum/*``: prompts drawn per
level, skipped entities, re-weights (see :mod:`karl_verl.integration.curriculum`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.ray_trainer import apply_kl_penalty
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from karl_verl.advantage import compute_karl_grpo_advantage
from karl_verl.config import KarlConfig
from karl_verl.integration.curriculum import TrainerCurriculum
from karl_verl.integration.estimator import NAME as KARL_ESTIMATOR
from karl_verl.integration.features import (
    Curriculum,
    LevelTagging,
    MasteryRefresh,
    Rollouts,
    TrainerFeature,
    build_features,
)
from karl_verl.integration.features.base import logger
from karl_verl.integration.features.mastery import STATE_FILE, IncompleteProbe, ProbeTimeout, call_with_timeout
from karl_verl.mastery_state import LEVEL_FIELD, MasteryState, RefreshRecord, RefreshSchedule

REGISTRY = "trainer (verl.trainer.ppo.v1.trainer_base)"
NAME = "karl"

#: Names kept here for callers of the trainer module (they live with the mastery-refresh feature).
__all__ = ["LEVEL_FIELD", "NAME", "STATE_FILE", "IncompleteProbe", "KarlTrainer", "ProbeTimeout", "call_with_timeout",
           "karl_advantage_for_multi_trajectories", "logger", "register"]


def _final_sessions(batch_keys: Sequence[str]) -> tuple[list[int], list[int]]:
    """Rows of each ``{uid}_{session}`` session's final output, and each row's session index.

    The same selection as verl's ``compute_advantage_for_multi_trajectories``: keys are
    ``{uid}_{session_id}_{index}``; only a session's last output takes part in group normalisation.
    """
    final: dict[str, tuple[int, int]] = {}
    row_sessions = []
    for row, key in enumerate(batch_keys):
        parts = key.rsplit("_", 2)
        if len(parts) != 3:
            raise ValueError(f"unexpected TransferQueue key {key!r}: expected '{{uid}}_{{session}}_{{index}}'")
        session, index = f"{parts[0]}_{parts[1]}", int(parts[2])
        row_sessions.append(session)
        if session not in final or final[session][0] < index:
            final[session] = (index, row)
    final_rows = [row for _, row in final.values()]
    local = {session: i for i, session in enumerate(final)}
    return final_rows, [local[session] for session in row_sessions]


def karl_advantage_for_multi_trajectories(
    data: DataProto,
    batch_keys: Sequence[str],
    levels: np.ndarray,
    *,
    norm_adv_by_std_in_grpo: bool,
    config: Any,
    on_policy: np.ndarray | None = None,
) -> DataProto:
    """verl's multi-trajectory GRPO advantage with ``karl_grpo`` and per-sample mastery levels.

    Mirrors ``verl.trainer.ppo.v1.utils.compute_advantage_for_multi_trajectories`` (GRPO branch): the
    advantage of each session's final output is broadcast to the session's other outputs. With
    all-ones ``algorithm.karl`` weights the result equals verl's GRPO bitwise. ``on_policy`` (per row)
    restricts each group's mean and std to its sampled rows (``karl.inject.on_policy_group_stats``).
    """
    final_rows, row_to_local = _final_sessions(batch_keys)
    final = data.select_idxs(final_rows)
    advantages, _ = compute_karl_grpo_advantage(
        token_level_rewards=final.batch["token_level_rewards"],
        response_mask=final.batch["response_mask"],
        index=final.non_tensor_batch["uid"],
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        config=config,
        mastery_levels=np.asarray(levels)[final_rows],
        stats_rows=None if on_policy is None else np.asarray(on_policy)[final_rows],
    )
    first_token = final.batch["response_mask"].argmax(dim=1)
    scores = advantages[torch.arange(len(final)), first_token][row_to_local]
    scores = scores.unsqueeze(-1) * data.batch["response_mask"]
    data.batch["advantages"] = scores
    data.batch["returns"] = scores
    return data


class _TaggingLoader:
    """Wraps verl's validation dataloader so that every batch dict is tagged (``knowledge_level``)."""

    def __init__(self, loader: Any, tag: Callable[[dict], None]) -> None:
        self._loader = loader
        self._tag = tag

    def __iter__(self) -> Iterator[dict]:
        for batch_dict in self._loader:
            self._tag(batch_dict)
            yield batch_dict

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class KarlTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer with KARL's features (runs in the TaskRunner, CPU).

    Each verl hook below calls verl's, then hands over to ``self.karl_features`` in order.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # verl's base trainer branches on ``trainer_mode == "sync"`` (replay buffer class, prompt refill,
        # TransferQueue checkpointing) and reads ``trainer.v1.<mode>`` settings; with the mode name
        # "karl" it would take the async paths. This trainer is the sync trainer: take its mode and
        # rebuild what verl's __init__ derived from the name.
        self.trainer_mode = "sync"
        self.parameter_sync_step = self.config.trainer.v1.get("sync", {}).get("parameter_sync_step", 1)
        self.karl_config = KarlConfig.from_mapping(config.get("karl"))
        self.karl_default_level = self.karl_config.reward.default_level_number
        self.karl_features: list[TrainerFeature] = build_features(self)
        self.karl_mastery: MasteryRefresh = self.karl_feature(MasteryRefresh)
        self.karl_levels: LevelTagging = self.karl_feature(LevelTagging)
        self.replay_buffer = self._build_replay_buffer()

    # ------------------------------------------------------------------ features

    def karl_feature(self, kind: type) -> Any:
        """This trainer's feature of class ``kind``, or None when it is not enabled."""
        return next((feature for feature in self.karl_features if isinstance(feature, kind)), None)

    def karl_dispatch(self, hook: str, *args: Any) -> None:
        """Call ``hook(*args)`` on every feature, in order."""
        for feature in self.karl_features:
            getattr(feature, hook)(*args)

    @property
    def karl_state(self) -> MasteryState:
        return self.karl_mastery.state

    @property
    def karl_schedule(self) -> RefreshSchedule:
        return self.karl_mastery.schedule

    @property
    def karl_curriculum(self) -> TrainerCurriculum | None:
        """The prompt curriculum (karl.curriculum), built with the train loader when enabled."""
        feature = self.karl_feature(Curriculum)
        return None if feature is None else feature.curriculum

    def karl_refresh(self, trigger: str) -> RefreshRecord:
        """Re-measure mastery and swap the table as a whole; on any failure keep the previous table."""
        return self.karl_mastery.refresh(trigger)

    def karl_probe_backend(self) -> Any:
        """A fresh probe backend on verl's rollout servers (override to probe elsewhere, e.g. in tests)."""
        return self.karl_mastery.probe_backend()

    def karl_level(self, extra_info: Any, reward_model: Any) -> tuple[int, str | None, bool]:
        """(level, entity, known) of one sample: table, else ``extra_info["knowledge_level"]``, else default."""
        return self.karl_levels.level(extra_info, reward_model)

    def karl_consume_metrics(self) -> dict[str, float]:
        """The KARL metrics gathered since the last call (every feature's), then reset."""
        out: dict[str, float] = {}
        for feature in self.karl_features:
            out.update(feature.metrics())
        return out

    def karl_state_path(self, global_step_folder: str) -> str:
        return os.path.join(global_step_folder, STATE_FILE)

    # ------------------------------------------------------------------ verl's hooks

    def _build_replay_buffer(self) -> ReplayBuffer:
        """verl's replay buffer, or a feature's (dynamic sampling's: see
        :mod:`karl_verl.integration.features.dynamic_sampling`). verl's ``__init__`` builds one
        before the features exist; ``__init__`` above builds it again."""
        build = partial(super()._build_replay_buffer)
        for feature in getattr(self, "karl_features", ()):
            buffer = feature.build_replay_buffer(build)
            if buffer is not None:
                return buffer
        return build()

    def _setup(self) -> None:
        super()._setup()
        self.karl_dispatch("on_setup")

    def _init_dataloader(self) -> None:
        super()._init_dataloader()
        self.karl_dispatch("on_init_dataloader")

    def on_train_begin(self) -> None:
        super().on_train_begin()
        self.karl_dispatch("on_train_begin")

    def on_step_begin(self) -> None:
        super().on_step_begin()
        self.karl_dispatch("on_step_begin")

    def on_step_end(self) -> None:
        super().on_step_end()
        self.karl_dispatch("on_step_end")

    def karl_rows_per_prompt(self) -> int:
        """Training rows each dataloader prompt becomes (iVGR's two streams: 2; else 1)."""
        return math.prod(feature.rows_per_prompt() for feature in self.karl_features)

    def _step_once(self, metrics: dict, timing_raw: dict, sample_batch_size: int) -> Any:
        """verl's step on ``karl_rows_per_prompt()`` x the prompts verl asks its replay buffer for (those
        are counted in dataloader prompts; with iVGR each one is two rows, both trained in the same step)."""
        return super()._step_once(metrics, timing_raw, sample_batch_size * self.karl_rows_per_prompt())

    def _fetch_one_gen_batch(self) -> TensorDict:
        """verl's prompt batch, expanded (iVGR's streams), then tagged by the features (its level first)
        before it goes to rollout."""
        batch = super()._fetch_one_gen_batch()
        for feature in self.karl_features:
            batch = feature.expand_prompts(batch)
        self.karl_dispatch("tag_prompts", batch)
        return batch

    def _add_prompts_to_generate(self, num_prompts: int) -> int:
        """verl's refill (the replay buffer calls it to replace dropped groups), shown to the features.

        ``num_prompts`` counts rows; with expanded prompts it fetches enough dataloader prompts for them
        (rounded up to whole ``data.gen_batch_size`` fetches, as verl's ``_next_train_batch`` needs).
        """
        factor = self.karl_rows_per_prompt()
        if factor > 1:
            gen_batch_size = self.config.data.get("gen_batch_size", None) or self.config.data.train_batch_size
            num_prompts = max(1, math.ceil(num_prompts / factor / gen_batch_size)) * gen_batch_size
        batch = self._next_train_batch(num_prompts)
        self.karl_dispatch("observe_refill", batch)
        return self._submit_batch_to_rollout(batch)

    def _validate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """verl's validation, with validation prompts tagged like training prompts."""
        self.karl_dispatch("on_validate_begin")
        loader = self.val_dataloader
        self.val_dataloader = _TaggingLoader(loader, partial(self.karl_dispatch, "tag_val_batch"))
        try:
            return super()._validate(*args, **kwargs)
        finally:
            self.val_dataloader = loader

    def _compute_old_log_prob(self, batch: Any, metrics: dict) -> Any:
        batch = super()._compute_old_log_prob(batch, metrics=metrics)
        self.karl_dispatch("after_old_log_prob", batch, metrics)
        return batch

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        """verl's advantage step; with ``karl_grpo`` the estimator gets every sample's mastery level.
        The features may change the rewards first (iVGR's consistency term)."""
        self.karl_dispatch("before_advantage", batch, metrics)
        levels = self.karl_levels.fetch_levels(batch)
        if self.config.algorithm.adv_estimator != KARL_ESTIMATOR:
            output = super()._compute_advantage(batch, metrics)
        else:
            output = self._karl_compute_advantage(batch, metrics, levels)
        # The incoming batch's tags say which rows are padding.
        rollouts = Rollouts.fetch(batch, levels)
        self.karl_dispatch("observe_rollouts", rollouts)
        self.karl_dispatch("observe_outcomes", rollouts.extra_infos, rollouts.reward_models, rollouts.valid,
                           list(rollouts.accs))
        return output

    def _karl_compute_advantage(self, batch: Any, metrics: dict, levels: np.ndarray) -> Any:
        """``PPOTrainer._compute_advantage`` of verl 0.9.1 step by step; only step 3 differs.

        verl passes a custom estimator no per-sample field, so step 3 calls ``karl_grpo`` itself
        (:func:`karl_advantage_for_multi_trajectories`) with the levels fetched from TransferQueue.
        """
        fields = ["uid", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs", "ref_log_prob", "values"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)

        response_mask = data["response_mask"]
        data = DataProto(batch=data.to_padded_tensor())
        data.batch["token_level_scores"] = data.batch["rm_scores"]
        data.non_tensor_batch["uid"] = np.array(data.batch.pop("uid").tolist(), dtype=object)

        # 1. apply kl penalty to rewards
        algorithm = self.config.algorithm
        if algorithm.use_kl_in_reward:
            data, kl_metrics = apply_kl_penalty(data, kl_ctrl=self.kl_ctrl_in_reward, kl_penalty=algorithm.kl_penalty)
            metrics.update(kl_metrics)
        else:
            data.batch["token_level_rewards"] = data.batch["token_level_scores"]

        # 2. rollout correction (decoupled mode only)
        rollout_corr_config = algorithm.get("rollout_correction", None)
        bypass_recomputing_logprobs = rollout_corr_config and rollout_corr_config.get("bypass_mode", False)
        rollout_correction = (
            rollout_corr_config is not None and "rollout_log_probs" in data.batch and not bypass_recomputing_logprobs
        )
        if rollout_correction:
            data, is_metrics = compute_rollout_correction_and_add_to_batch(data, rollout_corr_config)
            metrics.update(is_metrics)

        # 3. karl_grpo with per-sample mastery levels
        data = karl_advantage_for_multi_trajectories(
            data, batch.keys, levels,
            norm_adv_by_std_in_grpo=algorithm.get("norm_adv_by_std_in_grpo", True),
            config=algorithm,
            on_policy=self._karl_on_policy_rows(batch),
        )

        # 4. write nested advantages and returns back to TransferQueue
        out_fields = ["advantages", "returns"]
        if algorithm.use_kl_in_reward:
            out_fields.append("token_level_rewards")
        if rollout_correction:
            out_fields.append("response_mask")
            if "rollout_is_weights" in data.batch:
                out_fields.append("rollout_is_weights")
        output = TensorDict({key: response_to_nested(data.batch[key], response_mask) for key in out_fields},
                            batch_size=len(batch))
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)

    def _karl_on_policy_rows(self, batch: Any) -> np.ndarray | None:
        """The first feature's on-policy rows (injection's), or None: every row counts."""
        for feature in self.karl_features:
            rows = feature.on_policy_rows(batch)
            if rows is not None:
                return rows
        return None

    def _compute_metrics(self, batch: Any, metrics: dict, timing_raw: dict, global_steps: int, epoch: int) -> None:
        """verl's metrics, plus the features' (per-level, refresh, filter, curriculum, inject)."""
        from karl_verl.integration.inject_loss import fold_offpolicy_ratio

        fold_offpolicy_ratio(metrics)
        super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
        metrics.update(self.karl_consume_metrics())

    def _save_checkpoint(self) -> None:
        """The features' state files (the mastery state: JSON, atomic) into the step folder, then verl's.

        Written first so that verl's ``latest_checkpointed_iteration.txt``, which verl writes last,
        never points at a folder without them.
        """
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        self.karl_dispatch("save_state", folder)
        super()._save_checkpoint()

    def _karl_resume_folder(self) -> str:
        """The ``global_step_N`` folder verl's ``_load_checkpoint`` just resumed from."""
        trainer = self.config.trainer
        if trainer.resume_mode == "resume_path":
            folder = str(trainer.resume_from_path)
        else:
            folder = os.path.join(str(trainer.default_local_dir), f"global_step_{self.global_steps}")
        return folder if os.path.isabs(folder) else os.path.join(os.getcwd(), folder)

    def _load_checkpoint(self) -> None:
        """verl's resume, then the features' state saved with that checkpoint (mastery state first)."""
        super()._load_checkpoint()
        if self.global_steps > 0:
            self.karl_dispatch("load_state", self._karl_resume_folder())


def register() -> None:
    """Register :class:`KarlTrainer` as verl's trainer ``karl`` (idempotent: same class again is a no-op)."""
    register_trainer(NAME)(KarlTrainer)


def is_registered() -> bool:
    return TRAINER_REGISTRY.get(NAME) is KarlTrainer


# Importing this module registers it, as verl's own decorators do (a dict entry, nothing more):
# so a part imported on its own, before verl, is registered too (see register_all).
register()
