"""The ``karl`` trainer: verl's v1 sync trainer plus KARL's knowledge-mastery bookkeeping.

Select it with ``trainer.v1.trainer_mode=karl`` (the ``karl_kvg`` recipe does). What runs where:

* :class:`KarlTrainer` runs in verl's TaskRunner (a Ray actor, CPU): the driver of training. It holds
  the mastery table (:class:`~karl_verl.mastery_state.MasteryState`), loads or probes it at train
  begin, refreshes it on the schedule of ``karl.mastery.refresh_every_*`` (swapping it as a whole),
  saves it with every checkpoint and restores it on resume.
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

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
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
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.padding import response_to_nested

from karl_verl.advantage import compute_karl_grpo_advantage
from karl_verl.config import ConfigError, KarlConfig
from karl_verl.integration.curriculum import TrainerCurriculum
from karl_verl.integration.dynamic_sampling import (
    HeldBudgetWarning,
    KarlReplayBuffer,
    constant_groups,
    filter_metric,
    filter_metrics,
    row_metric_values,
)
from karl_verl.integration.estimator import NAME as KARL_ESTIMATOR
from karl_verl.integration.tq_fields import padded, row_field
from karl_verl.mastery import MasteryError, MasteryTable, parse_level
from karl_verl.mastery_state import (
    LEVEL_FIELD,
    LevelStats,
    MasteryState,
    RefreshRecord,
    RefreshSchedule,
    diff_tables,
    distribution_metrics,
    finite_or_none,
    refresh_metrics,
    sample_entity,
    sample_level,
)
from karl_verl.online import OnlineMastery, blend_table, online_table

REGISTRY = "trainer (verl.trainer.ppo.v1.trainer_base)"
NAME = "karl"

#: The mastery state's file inside each verl ``global_step_N`` checkpoint folder.
STATE_FILE = "karl_mastery_state.json"

logger = logging.getLogger(__name__)


class ProbeTimeout(TimeoutError):
    """The probe did not finish within ``karl.mastery.probe_timeout_s``."""


class IncompleteProbe(RuntimeError):
    """The probe came back short: fewer answers than questions, or probed entities missing."""


def call_with_timeout(fn: Callable[[], Any], timeout_s: float, *, on_timeout: Callable[[], None] | None = None,
                      grace_s: float = 30.0) -> Any:
    """Run ``fn()`` in a daemon thread; raise :class:`ProbeTimeout` if it takes longer than ``timeout_s``.

    On timeout ``on_timeout()`` is called (the backend cancels its requests) and the thread gets
    ``grace_s`` to wind down; a daemon thread that still runs is abandoned (it cannot block exit).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as err:  # re-raised in the caller's thread below
            outcome["error"] = err

    thread = threading.Thread(target=target, name="karl-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        if on_timeout is not None:
            on_timeout()
        thread.join(grace_s)
        raise ProbeTimeout(f"the probe did not finish within {timeout_s:g} s (karl.mastery.probe_timeout_s)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _reward_infos(data: Any, size: int) -> list[dict]:
    """Each row's reward breakdown (``extra_fields["reward_extra_info"]``), {} where there is none."""
    return [extra.get("reward_extra_info", {}) if isinstance(extra, dict) else {}
            for extra in row_field(data, "extra_fields", size)]


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


class _LevelTaggingLoader:
    """Wraps verl's validation dataloader so that every batch dict carries ``knowledge_level``."""

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
    """verl's synchronous v1 trainer with KARL's mastery levels (runs in the TaskRunner, CPU)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # verl's base trainer branches on ``trainer_mode == "sync"`` (replay buffer class, prompt refill,
        # TransferQueue checkpointing) and reads ``trainer.v1.<mode>`` settings; with the mode name
        # "karl" it would take the async paths. This trainer is the sync trainer: take its mode and
        # rebuild what verl's __init__ derived from the name.
        self.trainer_mode = "sync"
        self.parameter_sync_step = self.config.trainer.v1.get("sync", {}).get("parameter_sync_step", 1)
        self.replay_buffer = self._build_replay_buffer()
        self.karl_config = KarlConfig.from_mapping(config.get("karl"))
        mastery = self.karl_config.mastery
        self.karl_default_level = self.karl_config.reward.default_level_number
        self.karl_schedule = RefreshSchedule(int(mastery.refresh_every_epochs), int(mastery.refresh_every_steps))
        self.karl_state = MasteryState(online=self._karl_new_online())
        self._karl_step_stats = LevelStats()
        self._karl_counts: Counter[str] = Counter()
        #: Prompts generated to replace groups the dynamic-sampling filter dropped, per level.
        self._karl_refilled: Counter[int] = Counter()
        self._karl_pending_metrics: dict[str, float] = {}
        self._karl_questions: list[Any] | None = None
        self._karl_last_refresh_end: float | None = None
        self._karl_warned: set[str] = set()
        self._karl_model_type: str | None = None
        #: The first probe's seconds per question and the first step's start (the refresh budget).
        self._karl_seconds_per_question: float | None = None
        self._karl_step_started: float | None = None
        self._karl_budget_reported = False
        #: The prompt curriculum (karl.curriculum), built with the train loader when enabled.
        self.karl_curriculum: TrainerCurriculum | None = None
        self._karl_check_config()
        #: Knowledge-infused rollouts (karl.inject), None when off.
        self.karl_inject = None
        if self.karl_config.inject.enable:
            from karl_verl.integration.inject import InjectionDriver

            self.karl_inject = InjectionDriver.create(self.karl_config.inject, config)

    # ------------------------------------------------------------------ configuration

    def _build_replay_buffer(self) -> ReplayBuffer:
        """verl's replay buffer; with dynamic sampling on, the one that counts dropped groups per level
        and honours ``algorithm.filter_groups.max_num_gen_batches`` (see
        :mod:`karl_verl.integration.dynamic_sampling`)."""
        from verl.trainer.ppo.v1 import trainer_base

        held = HeldBudgetWarning()
        trainer_base.logger.addFilter(held)
        try:
            buffer = super()._build_replay_buffer()
        finally:
            trainer_base.logger.removeFilter(held)
        if self.trainer_mode == "sync" and type(buffer) is ReplayBuffer and filter_metric(self.config):
            budget = int(self.config.algorithm.filter_groups.get("max_num_gen_batches", 0) or 0)
            if budget > 0:
                logger.warning("karl: algorithm.filter_groups.max_num_gen_batches=%d is honoured: dynamic sampling "
                               "stops filtering within a step after %d prompt batches (verl's own v1 trainer "
                               "would ignore it)", budget, budget)
            buffer = KarlReplayBuffer.specialise(buffer, max_gen_batches=budget)
            buffer.karl_observe_dropped = self._karl_observe_dropped
        else:
            held.release(trainer_base.logger)
        return buffer

    def _karl_observe_dropped(self, partition_id: str, keys: list[str]) -> None:
        """The outcomes of groups the dynamic-sampling filter drops, counted like trained ones.

        Without this the online mastery estimate and the curriculum's band-pass would only see the
        groups the filter keeps (mixed ones): an entity that always fails would never be counted as
        failing. Nothing reaches the per-step training statistics (these rows are not trained on).
        """
        if self.karl_state.online is None and self.karl_curriculum is None:
            return
        data = tq.kv_batch_get(keys=keys, partition_id=partition_id,
                               select_fields=["extra_fields", "extra_info", "reward_model"])
        size = len(keys)
        accs = [finite_or_none(info.get("acc")) for info in _reward_infos(data, size)]
        self._karl_count_outcomes(row_field(data, "extra_info", size), row_field(data, "reward_model", size),
                                  np.ones(size, dtype=bool), accs)

    def _karl_new_online(self) -> OnlineMastery | None:
        mastery = self.karl_config.mastery
        if mastery.source == "probe":
            return None
        alpha, beta = mastery.online_prior
        return OnlineMastery(prior_alpha=alpha, prior_beta=beta, decay=mastery.online_decay)

    def _karl_check_config(self) -> None:
        """Fail before any worker starts on a configuration that cannot work; warn on dubious ones."""
        mastery = self.karl_config.mastery
        problem = mastery.missing_inputs()
        if problem:
            raise ConfigError(problem)
        if mastery.source == "probe" and self.karl_schedule.enabled and not mastery.probe_data:
            logger.warning("karl: refresh %s requested but karl.mastery.probe_data is not set; the table from "
                           "%s is kept for the whole run", self.karl_schedule.describe(), mastery.table_path)
            self.karl_schedule = RefreshSchedule(0, 0)
        if self.config.algorithm.adv_estimator != KARL_ESTIMATOR:
            logger.warning("karl: algorithm.adv_estimator=%s: mastery levels reach the reward but not the advantage "
                           "(set algorithm.adv_estimator=%s for mastery-weighted advantages)",
                           self.config.algorithm.adv_estimator, KARL_ESTIMATOR)

    def _karl_epoch(self) -> int:
        steps = max(int(getattr(self, "steps_per_epoch", 0) or 0), 1)
        return max(self.global_steps - 1, 0) // steps

    def _karl_warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._karl_warned:
            self._karl_warned.add(key)
            logger.warning(message, *args)

    def _setup(self) -> None:
        """verl's setup; with ``karl.inject`` on, the actor workers then get the loss with the off-policy term."""
        super()._setup()
        if self.karl_inject is not None:
            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(self.karl_inject.loss_fn(actor_config))

    # ------------------------------------------------------------------ hooks

    def _init_dataloader(self) -> None:
        """verl's loaders; with ``karl.curriculum.enable`` the train loader draws through the curriculum."""
        super()._init_dataloader()
        if self.karl_config.curriculum.enable:
            self.karl_curriculum = TrainerCurriculum.from_trainer(self)
            self.train_dataloader = self.karl_curriculum.loader

    def on_train_begin(self) -> None:
        """Load the configured table, or probe; nothing to do when the table is already there.

        It is there when a checkpoint restored the state, or when verl's validation before training
        (which runs before this hook) set it up: see :meth:`_validate`.
        """
        super().on_train_begin()
        if self.karl_state.initialized:
            logger.info("karl: training starts with the mastery table already set up (%d entities, %d table "
                        "changes so far)", len(self.karl_state.table), len(self.karl_state.history))
            return
        self._karl_initialize()

    def on_step_begin(self) -> None:
        """Refresh at the step boundary when the schedule says so (rollout replicas are awake here)."""
        super().on_step_begin()
        if self.karl_schedule.is_due(self.global_steps, int(getattr(self, "steps_per_epoch", 0) or 0)):
            self.karl_refresh(self.karl_schedule.trigger)
        self._karl_step_started = time.monotonic()

    def on_step_end(self) -> None:
        """After the first training step: the refresh budget (a refresh's estimated share of an epoch)."""
        super().on_step_end()
        if not self._karl_budget_reported and self._karl_step_started is not None:
            self._karl_budget_reported = True
            self._karl_report_budget(time.monotonic() - self._karl_step_started)

    def _karl_report_budget(self, step_seconds: float) -> None:
        mastery = self.karl_config.mastery
        if (self._karl_seconds_per_question is None or not self.karl_schedule.enabled
                or mastery.source == "online"):
            return
        questions = len(self._karl_refresh_questions(0))
        refresh_s = questions * self._karl_seconds_per_question
        epoch_s = step_seconds * max(int(getattr(self, "steps_per_epoch", 0) or 0), 1)
        share = refresh_s / (refresh_s + epoch_s) if refresh_s + epoch_s > 0 else 0.0
        self._karl_pending_metrics["karl/refresh/estimated_epoch_share"] = share
        self._karl_pending_metrics["karl/refresh/estimated_time_s"] = refresh_s
        message = ("karl: refresh budget: %d questions per refresh (%s), about %.0f s each at the first probe's "
                   "%.1f ms per question; an epoch of %d steps takes about %.0f s, so a refresh is %.1f%% of it")
        args = (questions, f"up to {mastery.refresh_questions_per_entity} per entity", refresh_s,
                1000 * self._karl_seconds_per_question, int(getattr(self, "steps_per_epoch", 0) or 0), epoch_s,
                100 * share)
        if share > mastery.max_refresh_share:
            logger.warning(message + " (above karl.mastery.max_refresh_share %.0f%%: lower "
                           "karl.mastery.refresh_questions_per_entity or refresh less often)", *args,
                           100 * mastery.max_refresh_share)
        else:
            logger.info(message, *args)

    # ------------------------------------------------------------------ table lifecycle

    def _karl_initialize(self) -> None:
        """Set the first table: the configured file, else a probe, else none (all default level).

        A probe that fails here raises: there is no previous table to fall back on, and training with
        every entity at the default level is not what was asked for.
        """
        mastery = self.karl_config.mastery
        start = time.monotonic()
        record = RefreshRecord(step=self.global_steps, epoch=self._karl_epoch(), trigger="train_begin", source="none")
        if mastery.table_path:
            table = MasteryTable.load(mastery.table_path)
            record.source = "table_file"
        elif mastery.probe_data:
            try:
                result = self._karl_probe(record.epoch)
            except Exception as err:
                raise RuntimeError(
                    f"karl: the mastery probe at train begin failed ({type(err).__name__}: {err}); set "
                    "karl.mastery.table_path to start from a measured table, or fix the probe"
                ) from err
            table = result.table
            record.source = "probe"
            self._karl_fill_probe(record, result)
            if result.num_questions:
                self._karl_seconds_per_question = (time.monotonic() - start) / result.num_questions
                logger.info("karl: the probe at train begin asked %d questions in %.1f s", result.num_questions,
                            time.monotonic() - start)
        else:
            table = MasteryTable(meta={"source": "none"})
            logger.warning("karl: no mastery table and no probe set: every entity starts at level %d; the online "
                           "estimate takes over as rollouts come in", self.karl_default_level)
        record.wall_time_s = time.monotonic() - start
        self._karl_swap(table, base=table, record=record, time_share=None)

    def karl_refresh(self, trigger: str) -> RefreshRecord:
        """Re-measure mastery and swap the table as a whole; on any failure keep the previous table.

        ``trigger`` names the cause in the history ("epoch", "step", or anything a caller chooses).
        """
        mastery = self.karl_config.mastery
        state = self.karl_state
        start = time.monotonic()
        time_share_base = None if self._karl_last_refresh_end is None else start - self._karl_last_refresh_end
        record = RefreshRecord(step=self.global_steps, epoch=self._karl_epoch(), trigger=trigger, source=mastery.source)
        try:
            base = state.base_table
            if mastery.source != "online" and mastery.probe_data:
                result = self._karl_probe(record.epoch)
                base = result.table
                self._karl_fill_probe(record, result)
            if mastery.source == "online":
                table = online_table(state.online, base, thresholds=mastery.thresholds,
                                     min_evidence=mastery.online_min_evidence, epoch=record.epoch)
            elif mastery.source == "blend":
                table = blend_table(base, state.online, weight=mastery.online_weight, thresholds=mastery.thresholds,
                                    min_evidence=mastery.online_min_evidence, epoch=record.epoch)
            else:
                table = base
            if table is None:
                raise MasteryError("no table to refresh from")
        except Exception as err:
            record.status = "failed"
            record.error = f"{type(err).__name__}: {err}"
            record.wall_time_s = time.monotonic() - start
            state.history.append(record)
            self._karl_last_refresh_end = time.monotonic()
            share = self._karl_time_share(record.wall_time_s, time_share_base)
            self._karl_pending_metrics.update(refresh_metrics(record, failures_total=state.num_failures,
                                                              time_share=share))
            logger.warning("karl: mastery refresh at step %d (epoch %d) failed (%s); training goes on with the "
                           "previous table (%d entities)", record.step, record.epoch, record.error, len(state.table))
            return record
        if state.online is not None:
            state.online.apply_decay()  # after the estimate: older policies' rollouts weigh less next time
        record.wall_time_s = time.monotonic() - start
        self._karl_swap(table, base=base, record=record,
                        time_share=self._karl_time_share(record.wall_time_s, time_share_base))
        return record

    @staticmethod
    def _karl_time_share(wall_time_s: float, trained_s: float | None) -> float | None:
        if trained_s is None:
            return None
        total = wall_time_s + max(trained_s, 0.0)
        return wall_time_s / total if total > 0 else None

    def _karl_swap(self, table: MasteryTable, *, base: MasteryTable | None, record: RefreshRecord,
                   time_share: float | None) -> None:
        """Install ``table`` as a whole and record the refresh (history, metrics, log line)."""
        state = self.karl_state
        diff = diff_tables(state.table if state.initialized else None, table)
        record.num_entities = len(table)
        record.distribution = table.distribution()
        record.moved_up, record.moved_down = diff.moved_up, diff.moved_down
        record.added, record.removed = diff.added, diff.removed
        state.table = table
        state.base_table = base
        state.history.append(record)
        self._karl_last_refresh_end = time.monotonic()
        self._karl_pending_metrics.update(refresh_metrics(record, failures_total=state.num_failures,
                                                          time_share=time_share))
        self._karl_pending_metrics.update(distribution_metrics(table))
        if self.karl_curriculum is not None:
            self.karl_curriculum.on_table(table, record.trigger)
        logger.info("karl: mastery table from %s at step %d (%s): %d entities, distribution %s, %d up / %d down, "
                    "%.1f s", record.source, record.step, record.trigger, len(table), record.distribution,
                    diff.moved_up, diff.moved_down, record.wall_time_s)

    # ------------------------------------------------------------------ probe

    def _karl_probe_questions(self) -> list[Any]:
        """The probe's questions, built once from ``karl.mastery.probe_data`` (the same at every refresh)."""
        if self._karl_questions is None:
            from karl_verl.probe.questions import build_questions, load_probe_set

            mastery = self.karl_config.mastery
            # Lazily: a question keeps where its image is, not the image (memory stays flat in the set's size).
            items = load_probe_set(mastery.probe_data, lazy=True)
            self._karl_questions = build_questions(items, per_entity=mastery.probe_images_per_entity,
                                                   seed=mastery.seed)
        return self._karl_questions

    def karl_probe_backend(self) -> Any:
        """A fresh probe backend on verl's rollout servers (override to probe elsewhere, e.g. in tests)."""
        from karl_verl.integration.rollout_probe import RolloutProbeBackend, model_type_of

        if self._karl_model_type is None:
            self._karl_model_type = model_type_of(self.config) or ""
        return RolloutProbeBackend.from_trainer(self, hf_model_type=self._karl_model_type or None,
                                                max_concurrency=self.karl_config.mastery.probe_max_concurrency,
                                                prepare_workers=self.karl_config.mastery.probe_prepare_workers)

    def _karl_call_probe(self, questions: Sequence[Any], backend: Any, mode: str, epoch: int) -> Any:
        from karl_verl.probe.runner import run_probe

        return run_probe(questions, backend, mode=mode, thresholds=self.karl_config.mastery.thresholds,
                         epoch=epoch, progress=False)

    def _karl_refresh_questions(self, refresh_index: int) -> list[Any]:
        """This refresh's questions: up to ``refresh_questions_per_entity`` per entity, drawn afresh per refresh.

        Seeded by ``karl.mastery.seed`` and the refresh's index in the history, so a resumed run asks
        what the uninterrupted one asked.
        """
        import random

        questions = self._karl_probe_questions()
        limit = int(self.karl_config.mastery.refresh_questions_per_entity)
        by_entity: dict[str, list[Any]] = {}
        for question in questions:
            by_entity.setdefault(question.entity, []).append(question)
        if all(len(group) <= limit for group in by_entity.values()):
            kept = list(questions)
        else:
            rng = random.Random(f"{self.karl_config.mastery.seed}/{refresh_index}")
            chosen = {id(q) for group in by_entity.values()
                      for q in (group if len(group) <= limit else rng.sample(group, limit))}
            kept = [q for q in questions if id(q) in chosen]
        # In file order: lazily read images then come row group by row group, each read once.
        return sorted(kept, key=lambda q: (getattr(q.image, "path", ""), getattr(q.image, "index", 0)))

    def _karl_probe(self, epoch: int) -> Any:
        """Run the probe with the configured timeout; raise on failure, timeout or short answers."""
        mastery = self.karl_config.mastery
        questions = self._karl_refresh_questions(len(self.karl_state.history))
        backend = self.karl_probe_backend()
        mode = mastery.probe_mode
        if mode in ("logprob", "choice") and not getattr(backend, "supports_logprobs", True):
            self._karl_warn_once("probe_mode", f"karl: probe_mode={mode} needs prompt log-probabilities or "
                                 "allowed_token_ids, which only vLLM (and karl-verl's CPU) rollout servers "
                                 "answer; probing in generate mode instead")
            mode = "generate"
        try:
            result = call_with_timeout(lambda: self._karl_call_probe(questions, backend, mode, epoch),
                                       mastery.probe_timeout_s, on_timeout=getattr(backend, "cancel", None))
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        self._karl_check_complete(result, questions)
        return result

    @staticmethod
    def _karl_check_complete(result: Any, questions: Sequence[Any]) -> None:
        if result.num_questions != len(questions) or len(result.decisions) != len(questions):
            raise IncompleteProbe(f"the probe answered {len(result.decisions)} of {len(questions)} questions")
        missing = sorted({q.entity for q in questions} - set(result.table.entries))
        if missing:
            raise IncompleteProbe(f"the probe's table lacks {len(missing)} probed entities, e.g. {missing[:3]}")
        if result.num_unparseable >= len(questions):
            raise IncompleteProbe("no probe reply named a letter (generate mode): check max tokens and the prompt")

    @staticmethod
    def _karl_fill_probe(record: RefreshRecord, result: Any) -> None:
        record.num_questions = int(result.num_questions)
        record.num_unparseable = int(result.num_unparseable)
        record.probe_mode = getattr(result, "mode", None)

    # ------------------------------------------------------------------ levels on samples

    def karl_level(self, extra_info: Any, reward_model: Any) -> tuple[int, str | None, bool]:
        """(level, entity, known) of one sample: table, else ``extra_info["knowledge_level"]``, else default."""
        return sample_level(extra_info, reward_model, self.karl_state.table, self.karl_default_level)

    def _karl_levels(self, extra_infos: Sequence[Any], reward_models: Sequence[Any], *, count: bool) -> list[int]:
        levels = []
        for extra_info, reward_model in zip(extra_infos, reward_models, strict=True):
            level, entity, known = self.karl_level(extra_info, reward_model)
            levels.append(level)
            if count and not known:
                self._karl_counts["defaulted"] += 1
                if entity is None:
                    self._karl_counts["no_entity"] += 1
                else:
                    self.karl_state.unknown_entities.add(entity)
        return levels

    def _fetch_one_gen_batch(self) -> TensorDict:
        """verl's prompt batch, each prompt tagged with its level before it goes to rollout."""
        batch = super()._fetch_one_gen_batch()
        size = len(batch)
        levels = self._karl_levels(row_field(batch, "extra_info", size), row_field(batch, "reward_model", size),
                                   count=True)
        tu.assign_non_tensor_stack(batch, LEVEL_FIELD, levels)
        if self.karl_inject is not None:
            self.karl_inject.tag(batch, levels, row_field(batch, "extra_info", size))
        return batch

    def _add_prompts_to_generate(self, num_prompts: int) -> int:
        """verl's refill (the replay buffer calls it to replace dropped groups), counted per level."""
        batch = self._next_train_batch(num_prompts)
        self._karl_refilled.update(int(level) for level in row_field(batch, LEVEL_FIELD, len(batch)))
        return self._submit_batch_to_rollout(batch)

    def _karl_tag_batch_dict(self, batch_dict: dict) -> None:
        size = len(batch_dict["raw_prompt"])
        levels = self._karl_levels(row_field(batch_dict, "extra_info", size),
                                   row_field(batch_dict, "reward_model", size), count=False)
        batch_dict[LEVEL_FIELD] = np.array(levels, dtype=object)

    def _validate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """verl's validation, with validation prompts tagged like training prompts.

        verl's ``fit`` validates before ``on_train_begin`` (``trainer.val_before_train``, on by
        default), so the first table is set up here when it is not there yet; otherwise that first
        validation would score every entity at the default level.
        """
        if not self.karl_state.initialized:
            self._karl_initialize()
        loader = self.val_dataloader
        self.val_dataloader = _LevelTaggingLoader(loader, self._karl_tag_batch_dict)
        try:
            return super()._validate(*args, **kwargs)
        finally:
            self.val_dataloader = loader

    def _karl_fetch_levels(self, batch: Any) -> np.ndarray:
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
            self._karl_warn_once("missing_field", "karl: %d samples arrived without %r; their level comes from the "
                                 "trainer's current table", len(missing), LEVEL_FIELD)
            self._karl_counts["missing_field"] += len(missing)
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=["extra_info", "reward_model"])
            recomputed = self._karl_levels(row_field(data, "extra_info", size), row_field(data, "reward_model", size),
                                           count=False)
            raw = [recomputed[i] if value is None else value for i, value in enumerate(raw)]
        return np.asarray([parse_level(value, where=f"{LEVEL_FIELD}[{i}]") for i, value in enumerate(raw)],
                          dtype=np.int64)

    # ------------------------------------------------------------------ advantage

    def _compute_old_log_prob(self, batch: Any, metrics: dict) -> Any:
        """verl's old log-probs; with injection, injected rows then get them as rollout log-probs too
        (:meth:`~karl_verl.integration.inject.InjectionDriver.align_rollout_log_probs`)."""
        batch = super()._compute_old_log_prob(batch, metrics=metrics)
        if self.karl_inject is not None and self.config.actor_rollout_ref.rollout.calculate_log_probs:
            self.karl_inject.align_rollout_log_probs(batch, metrics)
        return batch

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        """verl's advantage step; with ``karl_grpo`` the estimator gets every sample's mastery level."""
        levels = self._karl_fetch_levels(batch)
        if self.config.algorithm.adv_estimator != KARL_ESTIMATOR:
            output = super()._compute_advantage(batch, metrics)
        else:
            output = self._karl_compute_advantage(batch, metrics, levels)
        self._karl_observe(batch, levels)  # the incoming batch's tags say which rows are padding
        if self.karl_inject is not None:
            self.karl_inject.observe(batch, levels)
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
            on_policy=None if self.karl_inject is None else self.karl_inject.on_policy_rows(batch),
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

    def _karl_observe(self, batch: Any, levels: np.ndarray) -> None:
        """Per-level step statistics and, for "online" / "blend", the posterior update (driver side).

        Padding rows (``is_padding`` tags, added by verl to fill data-parallel shards) are left out.
        """
        fields = ["advantages", "response_mask", "rm_scores", "extra_fields", "extra_info", "reward_model"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        size = len(batch)
        valid = np.array([not tag.get("is_padding", False) for tag in batch.tags], dtype=bool)
        mask = padded(data["response_mask"]).float()
        rewards = padded(data["rm_scores"]).float().sum(dim=-1).numpy()
        token_count = mask.sum(dim=-1)
        advantage_sum = (padded(data["advantages"]).float() * mask).sum(dim=-1)
        advantages = torch.where(token_count > 0, advantage_sum / token_count.clamp(min=1), torch.nan).numpy()
        infos = _reward_infos(data, size)
        ious = np.array([finite_or_none(info.get("iou")) for info in infos], dtype=object)
        accs = np.array([finite_or_none(info.get("acc")) for info in infos], dtype=object)
        self._karl_step_stats.add(levels[valid], rewards[valid], ious[valid], accs[valid], advantages[valid])
        # The reward worker's own record of the level it scored with (the karl manager reports it):
        # a sample whose reward and advantage saw different levels would be a bug in the level's travel.
        scored = [info.get("knowledge_level") for info in infos]
        self._karl_counts["reward_level_seen"] += sum(1 for ok, lv in zip(valid, scored, strict=True)
                                                     if ok and lv is not None)
        self._karl_counts["reward_errors"] += sum(1 for ok, info in zip(valid, infos, strict=True)
                                                  if ok and info.get("reward_error"))
        self._karl_counts["reward_level_mismatch"] += sum(
            1 for ok, lv, level in zip(valid, scored, levels, strict=True)
            if ok and lv is not None and int(lv) != int(level))
        metric = filter_metric(self.config)
        if metric is not None:
            values = row_metric_values(metric, infos, rewards)
            self._karl_counts["trained_constant_groups"] += constant_groups(batch.keys, values, valid)
        self._karl_count_outcomes(row_field(data, "extra_info", size), row_field(data, "reward_model", size), valid,
                                  list(accs))

    def _karl_count_outcomes(self, extra_infos: Sequence[Any], reward_models: Sequence[Any], valid: np.ndarray,
                             accs: Sequence[float | None]) -> None:
        """Rollout outcomes (acc@0.5) per entity for the curriculum's band-pass and the online estimate."""
        if self.karl_curriculum is not None:
            self.karl_curriculum.observe(extra_infos, reward_models, valid, accs)
        online = self.karl_state.online
        if online is None:
            return
        kept = [acc for acc, ok in zip(accs, valid, strict=True) if ok]
        if all(acc is None for acc in kept):
            self._karl_warn_once("no_acc", "karl: the reward reports no 'acc' (acc@0.5) per sample; the online "
                                 "mastery estimate gets no data (use reward.reward_manager.name=karl)")
            return
        entities = [sample_entity(e, r) for e, r, ok in zip(extra_infos, reward_models, valid, strict=True) if ok]
        online.observe(entities, kept)

    # ------------------------------------------------------------------ metrics

    def _compute_metrics(self, batch: Any, metrics: dict, timing_raw: dict, global_steps: int, epoch: int) -> None:
        """verl's metrics, plus this step's per-level metrics and any refresh metrics."""
        from karl_verl.integration.inject_loss import fold_offpolicy_ratio

        fold_offpolicy_ratio(metrics)
        super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
        metrics.update(self.karl_consume_metrics())

    def karl_consume_metrics(self) -> dict[str, float]:
        """The KARL metrics gathered since the last call (per-level stats, counts, refreshes), then reset."""
        out = self._karl_step_stats.metrics()
        out["karl/level/defaulted"] = float(self._karl_counts["defaulted"])
        out["karl/level/no_entity"] = float(self._karl_counts["no_entity"])
        out["karl/level/missing_field"] = float(self._karl_counts["missing_field"])
        out["karl/level/unknown_entities"] = float(len(self.karl_state.unknown_entities))
        out["karl/level/reward_level_seen"] = float(self._karl_counts["reward_level_seen"])
        out["karl/level/reward_level_mismatch"] = float(self._karl_counts["reward_level_mismatch"])
        out["karl/reward/errors"] = float(self._karl_counts["reward_errors"])
        if self.karl_curriculum is not None:
            out.update(self.karl_curriculum.metrics())
        metric = filter_metric(self.config)
        if metric is not None and isinstance(self.replay_buffer, KarlReplayBuffer):
            dropped, exhausted = self.replay_buffer.karl_take_dropped()
            out.update(filter_metrics(metric, dropped, self._karl_refilled, exhausted,
                                      self._karl_counts["trained_constant_groups"]))
        self._karl_refilled = Counter()
        out.update(self._karl_pending_metrics)
        if self.karl_inject is not None:
            out.update(self.karl_inject.consume_metrics())
        self._karl_step_stats = LevelStats()
        self._karl_counts.clear()
        self._karl_pending_metrics = {}
        return out

    # ------------------------------------------------------------------ checkpoints

    def karl_state_path(self, global_step_folder: str) -> str:
        return os.path.join(global_step_folder, STATE_FILE)

    def _save_checkpoint(self) -> None:
        """Write the mastery state (JSON, atomic) into the step folder, then verl's checkpoint.

        Written first so that verl's ``latest_checkpointed_iteration.txt``, which verl writes last,
        never points at a folder without it.
        """
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        self.karl_state.save(self.karl_state_path(folder))
        if self.karl_curriculum is not None:
            self.karl_curriculum.save(folder)
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
        """verl's resume, the mastery state, then the curriculum's (its levels come from the restored table)."""
        self._karl_load_checkpoint()
        if self.karl_curriculum is not None and self.global_steps > 0:
            self.karl_curriculum.restore(self._karl_resume_folder(), self.karl_state.table)

    def _karl_load_checkpoint(self) -> None:
        """verl's resume, then the mastery state saved with that checkpoint (table, history, posterior)."""
        super()._load_checkpoint()
        if self.global_steps <= 0:
            return
        path = self.karl_state_path(self._karl_resume_folder())
        if not os.path.isfile(path):
            logger.warning("karl: checkpoint has no %s (%s): mastery is set up afresh at train begin", STATE_FILE, path)
            return
        state = MasteryState.load(path)
        if state.online is None:
            state.online = self._karl_new_online()
        self.karl_state = state
        logger.info("karl: restored the mastery state from %s (%d entities, %d refreshes)", path, len(state.table),
                    len(state.history))


def register() -> None:
    """Register :class:`KarlTrainer` as verl's trainer ``karl`` (idempotent: same class again is a no-op)."""
    register_trainer(NAME)(KarlTrainer)


def is_registered() -> bool:
    return TRAINER_REGISTRY.get(NAME) is KarlTrainer


# Importing this module registers it, as verl's own decorators do (a dict entry, nothing more):
# so a part imported on its own, before verl, is registered too (see register_all).
register()
