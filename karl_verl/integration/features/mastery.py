"""Mastery refresh: the mastery table's lifecycle (load or probe at train begin, refresh on schedule,
swap as a whole), the online estimate's updates, and the state file in every checkpoint.

A refresh probes on the same rollout servers as training rollouts, through
:class:`~karl_verl.integration.rollout_probe.RolloutProbeBackend` (``trainer.karl_probe_backend``).
A refresh that raises, times out (``probe_timeout_s``) or comes back short keeps the previous table,
and is logged as a warning and as the metric ``karl/refresh/failed``. A single question the servers
cannot answer (unreadable image, prompt over ``max_model_len``, server error) is skipped instead:
the refresh goes on while the answered share stays at or above ``min_answered_share``, an entity
with no answered question keeps its previous entry, and each refresh logs ``karl/refresh/skipped_questions``,
``karl/refresh/answered_share`` and, when any was skipped, one warning line with the counts per reason.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from karl_verl.config import ConfigError
from karl_verl.integration.features.base import TrainerFeature, logger
from karl_verl.mastery import MasteryError, MasteryTable
from karl_verl.mastery_state import (
    MasteryState,
    RefreshRecord,
    RefreshSchedule,
    diff_tables,
    distribution_metrics,
    refresh_metrics,
    sample_entity,
)
from karl_verl.online import OnlineMastery, blend_table, online_table
from karl_verl.probe.runner import TooFewAnswers, describe_skipped, skipped_by_kind

#: The mastery state's file inside each verl ``global_step_N`` checkpoint folder.
STATE_FILE = "karl_mastery_state.json"


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


def time_share(wall_time_s: float, trained_s: float | None) -> float | None:
    if trained_s is None:
        return None
    total = wall_time_s + max(trained_s, 0.0)
    return wall_time_s / total if total > 0 else None


def check_complete(result: Any, questions: Sequence[Any]) -> None:
    """Every question answered or skipped (with a reason), and every entity with an answer in the table."""
    skipped = getattr(result, "skipped", None) or {}
    if result.num_questions != len(questions) or len(result.decisions) + len(skipped) != len(questions):
        raise IncompleteProbe(f"the probe answered {len(result.decisions)} and skipped {len(skipped)} of "
                              f"{len(questions)} questions")
    answered = {q.entity for q in questions if q.question_id in result.decisions}
    missing = sorted(answered - set(result.table.entries))
    if missing:
        raise IncompleteProbe(f"the probe's table lacks {len(missing)} probed entities, e.g. {missing[:3]}")
    if result.num_unparseable >= max(len(result.decisions), 1):
        raise IncompleteProbe("no probe reply named a letter (generate mode): check max tokens and the prompt")


def fill_probe(record: RefreshRecord, result: Any) -> None:
    record.num_questions = int(result.num_questions)
    record.num_unparseable = int(result.num_unparseable)
    record.probe_mode = getattr(result, "mode", None)
    fill_skipped(record, getattr(result, "skipped", None) or {})


def fill_skipped(record: RefreshRecord, skipped: Mapping[str, Any]) -> None:
    record.num_skipped = len(skipped)
    record.skipped_by_kind = skipped_by_kind(skipped)


def keep_previous_entries(table: MasteryTable, previous: MasteryTable | None,
                          entities: Sequence[str]) -> tuple[MasteryTable, list[str]]:
    """``table`` plus the previous entry of each of ``entities`` (probed, no question answered).

    No answer is no new evidence: such an entity keeps the level it had rather than dropping out of
    the table (which would put it at the default level). Returns (the table, the entities carried).
    """
    if previous is None:
        return table, []
    carried = sorted(entity for entity in entities if entity not in table.entries and entity in previous.entries)
    if not carried:
        return table, []
    entries = {**table.entries, **{entity: previous.entries[entity] for entity in carried}}
    return MasteryTable(entries=entries, meta={**table.meta, "carried_over": carried}), carried


class MasteryRefresh(TrainerFeature):
    """The mastery table (:class:`~karl_verl.mastery_state.MasteryState`) and its refresh schedule."""

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        mastery = trainer.karl_config.mastery
        self.schedule = RefreshSchedule(int(mastery.refresh_every_epochs), int(mastery.refresh_every_steps))
        self.state = MasteryState(online=self.new_online())
        self.pending_metrics: dict[str, float] = {}
        self.questions: list[Any] | None = None
        self._last_refresh_end: float | None = None
        self._model_type: str | None = None
        #: Built probe prompts kept across refreshes (created at the first probe).
        self.prompt_cache: Any = None
        #: The first probe's seconds per question and the first step's start (the refresh budget).
        self.seconds_per_question: float | None = None
        self._step_started: float | None = None
        self._budget_reported = False
        self._check_config()

    @property
    def wants_outcomes(self) -> bool:  # type: ignore[override]
        return self.state.online is not None

    def new_online(self) -> OnlineMastery | None:
        mastery = self.trainer.karl_config.mastery
        if mastery.source == "probe":
            return None
        alpha, beta = mastery.online_prior
        return OnlineMastery(prior_alpha=alpha, prior_beta=beta, decay=mastery.online_decay)

    def _check_config(self) -> None:
        """Fail before any worker starts on a configuration that cannot work; warn on dubious ones."""
        mastery = self.trainer.karl_config.mastery
        problem = mastery.missing_inputs()
        if problem:
            raise ConfigError(problem)
        if mastery.source == "probe" and self.schedule.enabled and not mastery.probe_data:
            logger.warning("karl: refresh %s requested but karl.mastery.probe_data is not set; the table from "
                           "%s is kept for the whole run", self.schedule.describe(), mastery.table_path)
            self.schedule = RefreshSchedule(0, 0)

    def _epoch(self) -> int:
        steps = max(int(getattr(self.trainer, "steps_per_epoch", 0) or 0), 1)
        return max(self.trainer.global_steps - 1, 0) // steps

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self) -> None:
        """Load the configured table, or probe; nothing to do when the table is already there.

        It is there when a checkpoint restored the state, or when verl's validation before training
        (which runs before this hook) set it up: see :meth:`on_validate_begin`.
        """
        if self.state.initialized:
            logger.info("karl: training starts with the mastery table already set up (%d entities, %d table "
                        "changes so far)", len(self.state.table), len(self.state.history))
            return
        self.initialize()

    def on_validate_begin(self) -> None:
        """verl's ``fit`` validates before ``on_train_begin`` (``trainer.val_before_train``): set up the
        first table here when it is not there yet, or that validation would score every entity at the
        default level."""
        if not self.state.initialized:
            self.initialize()

    def on_step_begin(self) -> None:
        """Refresh at the step boundary when the schedule says so (rollout replicas are awake here)."""
        trainer = self.trainer
        if self.schedule.is_due(trainer.global_steps, int(getattr(trainer, "steps_per_epoch", 0) or 0)):
            self.refresh(self.schedule.trigger)
        self._step_started = time.monotonic()

    def on_step_end(self) -> None:
        """After the first training step: the refresh budget (a refresh's estimated share of an epoch)."""
        if not self._budget_reported and self._step_started is not None:
            self._budget_reported = True
            self.report_budget(time.monotonic() - self._step_started)

    def observe_outcomes(self, extra_infos: Sequence[Any], reward_models: Sequence[Any], valid: np.ndarray,
                         accs: Sequence[float | None]) -> None:
        """For "online" / "blend": the posterior update from rollout outcomes (acc@0.5) per entity."""
        online = self.state.online
        if online is None:
            return
        kept = [acc for acc, ok in zip(accs, valid, strict=True) if ok]
        if all(acc is None for acc in kept):
            self.warn_once("no_acc", "karl: the reward reports no 'acc' (acc@0.5) per sample; the online "
                           "mastery estimate gets no data (use reward.reward_manager.name=karl)")
            return
        entities = [sample_entity(e, r) for e, r, ok in zip(extra_infos, reward_models, valid, strict=True) if ok]
        online.observe(entities, kept)

    def metrics(self) -> dict[str, float]:
        out, self.pending_metrics = self.pending_metrics, {}
        return out

    def save_state(self, folder: str) -> None:
        self.state.save(os.path.join(folder, STATE_FILE))

    def load_state(self, folder: str) -> None:
        """The mastery state saved with that checkpoint (table, history, posterior)."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            logger.warning("karl: checkpoint has no %s (%s): mastery is set up afresh at train begin", STATE_FILE, path)
            return
        state = MasteryState.load(path)
        if state.online is None:
            state.online = self.new_online()
        self.state = state
        logger.info("karl: restored the mastery state from %s (%d entities, %d refreshes)", path, len(state.table),
                    len(state.history))

    # ------------------------------------------------------------------ refresh budget

    def report_budget(self, step_seconds: float) -> None:
        mastery = self.trainer.karl_config.mastery
        if self.seconds_per_question is None or not self.schedule.enabled or mastery.source == "online":
            return
        steps_per_epoch = int(getattr(self.trainer, "steps_per_epoch", 0) or 0)
        questions = len(self.refresh_questions(0))
        refresh_s = questions * self.seconds_per_question
        epoch_s = step_seconds * max(steps_per_epoch, 1)
        share = refresh_s / (refresh_s + epoch_s) if refresh_s + epoch_s > 0 else 0.0
        self.pending_metrics["karl/refresh/estimated_epoch_share"] = share
        self.pending_metrics["karl/refresh/estimated_time_s"] = refresh_s
        message = ("karl: refresh budget: %d questions per refresh (%s), about %.0f s each at the first probe's "
                   "%.1f ms per question; an epoch of %d steps takes about %.0f s, so a refresh is %.1f%% of it")
        args = (questions, f"up to {mastery.refresh_questions_per_entity} per entity", refresh_s,
                1000 * self.seconds_per_question, steps_per_epoch, epoch_s, 100 * share)
        if share > mastery.max_refresh_share:
            logger.warning(message + " (above karl.mastery.max_refresh_share %.0f%%: lower "
                           "karl.mastery.refresh_questions_per_entity or refresh less often)", *args,
                           100 * mastery.max_refresh_share)
        else:
            logger.info(message, *args)

    # ------------------------------------------------------------------ table lifecycle

    def initialize(self) -> None:
        """Set the first table: the configured file, else a probe, else none (all default level).

        A probe that fails here raises: there is no previous table to fall back on, and training with
        every entity at the default level is not what was asked for.
        """
        mastery = self.trainer.karl_config.mastery
        start = time.monotonic()
        record = RefreshRecord(step=self.trainer.global_steps, epoch=self._epoch(), trigger="train_begin",
                               source="none")
        if mastery.table_path:
            table = MasteryTable.load(mastery.table_path)
            record.source = "table_file"
        elif mastery.probe_data:
            try:
                result = self.probe(record.epoch)
            except Exception as err:
                raise RuntimeError(
                    f"karl: the mastery probe at train begin failed ({type(err).__name__}: {err}); set "
                    "karl.mastery.table_path to start from a measured table, or fix the probe"
                ) from err
            table = result.table
            record.source = "probe"
            fill_probe(record, result)
            self.report_skipped(record, result)
            if result.num_questions:
                self.seconds_per_question = (time.monotonic() - start) / result.num_questions
                logger.info("karl: the probe at train begin asked %d questions in %.1f s", result.num_questions,
                            time.monotonic() - start)
        else:
            table = MasteryTable(meta={"source": "none"})
            logger.warning("karl: no mastery table and no probe set: every entity starts at level %d; the online "
                           "estimate takes over as rollouts come in", self.trainer.karl_default_level)
        record.wall_time_s = time.monotonic() - start
        self.swap(table, base=table, record=record, time_share=None)

    def refresh(self, trigger: str) -> RefreshRecord:
        """Re-measure mastery and swap the table as a whole; on any failure keep the previous table.

        ``trigger`` names the cause in the history ("epoch", "step", or anything a caller chooses).
        """
        mastery = self.trainer.karl_config.mastery
        state = self.state
        start = time.monotonic()
        trained_s = None if self._last_refresh_end is None else start - self._last_refresh_end
        record = RefreshRecord(step=self.trainer.global_steps, epoch=self._epoch(), trigger=trigger,
                               source=mastery.source)
        try:
            base = state.base_table
            if mastery.source != "online" and mastery.probe_data:
                try:
                    result = self.probe(record.epoch)
                except TooFewAnswers as err:
                    # the counts of the failed refresh, for its metrics (answered_share below the threshold)
                    record.num_questions = err.num_questions
                    fill_skipped(record, err.skipped)
                    raise
                base, record.carried_over = keep_previous_entries(
                    result.table, state.base_table, getattr(result, "unanswered_entities", ()))
                fill_probe(record, result)
                self.report_skipped(record, result)
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
            self._last_refresh_end = time.monotonic()
            share = time_share(record.wall_time_s, trained_s)
            self.pending_metrics.update(refresh_metrics(record, failures_total=state.num_failures, time_share=share))
            logger.warning("karl: mastery refresh at step %d (epoch %d) failed (%s); training goes on with the "
                           "previous table (%d entities)", record.step, record.epoch, record.error, len(state.table))
            return record
        if state.online is not None:
            state.online.apply_decay()  # after the estimate: older policies' rollouts weigh less next time
        record.wall_time_s = time.monotonic() - start
        self.swap(table, base=base, record=record, time_share=time_share(record.wall_time_s, trained_s))
        return record

    def swap(self, table: MasteryTable, *, base: MasteryTable | None, record: RefreshRecord,
             time_share: float | None) -> None:
        """Install ``table`` as a whole and record the refresh (history, metrics, log line); tell the features."""
        state = self.state
        diff = diff_tables(state.table if state.initialized else None, table)
        record.num_entities = len(table)
        record.distribution = table.distribution()
        record.moved_up, record.moved_down = diff.moved_up, diff.moved_down
        record.added, record.removed = diff.added, diff.removed
        state.table = table
        state.base_table = base
        state.history.append(record)
        self._last_refresh_end = time.monotonic()
        self.pending_metrics.update(refresh_metrics(record, failures_total=state.num_failures, time_share=time_share))
        self.pending_metrics.update(distribution_metrics(table))
        self.trainer.karl_dispatch("on_table", table, record.trigger)
        logger.info("karl: mastery table from %s at step %d (%s): %d entities, distribution %s, %d up / %d down, "
                    "%.1f s", record.source, record.step, record.trigger, len(table), record.distribution,
                    diff.moved_up, diff.moved_down, record.wall_time_s)

    # ------------------------------------------------------------------ probe

    def probe_questions(self) -> list[Any]:
        """The probe's questions, built once from ``karl.mastery.probe_data`` (the same at every refresh)."""
        if self.questions is None:
            from karl_verl.probe.questions import build_questions, load_probe_set

            mastery = self.trainer.karl_config.mastery
            # Lazily: a question keeps where its image is, not the image (memory stays flat in the set's size).
            items = load_probe_set(mastery.probe_data, lazy=True)
            self.questions = build_questions(items, per_entity=mastery.probe_images_per_entity, seed=mastery.seed)
        return self.questions

    def probe_backend(self) -> Any:
        """A fresh probe backend on verl's rollout servers."""
        from karl_verl.integration.rollout_probe import RolloutProbeBackend, model_type_of

        trainer = self.trainer
        mastery = trainer.karl_config.mastery
        if self._model_type is None:
            self._model_type = model_type_of(trainer.config) or ""
        return RolloutProbeBackend.from_trainer(trainer, hf_model_type=self._model_type or None,
                                                max_concurrency=mastery.probe_max_concurrency,
                                                prepare_workers=mastery.probe_prepare_workers,
                                                prompt_cache=self.probe_prompt_cache())

    def probe_prompt_cache(self) -> Any:
        """The run's built probe prompts (``karl.mastery.probe_prompt_cache_mib``), shared by every refresh."""
        if self.prompt_cache is None:
            from karl_verl.integration.rollout_probe import PromptCache

            self.prompt_cache = PromptCache(int(self.trainer.karl_config.mastery.probe_prompt_cache_mib) * 2**20)
        return self.prompt_cache

    def call_probe(self, questions: Sequence[Any], backend: Any, mode: str, epoch: int) -> Any:
        from karl_verl.probe.runner import run_probe

        mastery = self.trainer.karl_config.mastery
        return run_probe(questions, backend, mode=mode, thresholds=mastery.thresholds, epoch=epoch, progress=False,
                         min_answered_share=mastery.min_answered_share, max_pixels=mastery.probe_max_pixels)

    def report_skipped(self, record: RefreshRecord, result: Any) -> None:
        """One warning line per probe that skipped questions: counts per reason, the first few ids."""
        skipped = getattr(result, "skipped", None) or {}
        if not skipped:
            return
        unanswered = list(getattr(result, "unanswered_entities", ()))
        if record.carried_over:
            fate = f"; {len(record.carried_over)} entities with no answered question kept their previous level: " \
                   f"{record.carried_over[:5]}"
        elif unanswered:
            fate = f"; {len(unanswered)} entities with no answered question are not in the table: {unanswered[:5]}"
        else:
            fate = ""
        logger.warning("karl: the mastery probe at step %d (%s) skipped %d of %d questions (%.1f%% answered, at least "
                       "%g needed: karl.mastery.min_answered_share): %s%s", record.step, record.trigger, len(skipped),
                       result.num_questions, 100 * result.answered_share,
                       self.trainer.karl_config.mastery.min_answered_share, describe_skipped(skipped), fate)

    def refresh_questions(self, refresh_index: int) -> list[Any]:
        """This refresh's questions: up to ``refresh_questions_per_entity`` per entity, drawn afresh per refresh.

        Seeded by ``karl.mastery.seed`` and the refresh's index in the history, so a resumed run asks
        what the uninterrupted one asked.
        """
        mastery = self.trainer.karl_config.mastery
        questions = self.probe_questions()
        limit = int(mastery.refresh_questions_per_entity)
        by_entity: dict[str, list[Any]] = {}
        for question in questions:
            by_entity.setdefault(question.entity, []).append(question)
        if all(len(group) <= limit for group in by_entity.values()):
            kept = list(questions)
        else:
            rng = random.Random(f"{mastery.seed}/{refresh_index}")
            chosen = {id(q) for group in by_entity.values()
                      for q in (group if len(group) <= limit else rng.sample(group, limit))}
            kept = [q for q in questions if id(q) in chosen]
        # In file order: lazily read images then come row group by row group, each read once.
        return sorted(kept, key=lambda q: (getattr(q.image, "path", ""), getattr(q.image, "index", 0)))

    def probe(self, epoch: int) -> Any:
        """Run the probe with the configured timeout; raise on failure, timeout or short answers."""
        mastery = self.trainer.karl_config.mastery
        questions = self.refresh_questions(len(self.state.history))
        backend = self.trainer.karl_probe_backend()
        mode = mastery.probe_mode
        if mode in ("logprob", "choice") and not getattr(backend, "supports_logprobs", True):
            self.warn_once("probe_mode", f"karl: probe_mode={mode} needs prompt log-probabilities or "
                           "allowed_token_ids, which only vLLM (and karl-verl's CPU) rollout servers "
                           "answer; probing in generate mode instead")
            mode = "generate"
        try:
            result = call_with_timeout(lambda: self.call_probe(questions, backend, mode, epoch),
                                       mastery.probe_timeout_s, on_timeout=getattr(backend, "cancel", None))
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
            self.report_prompt_cache(getattr(backend, "prompt_cache", None))
        check_complete(result, questions)
        return result

    def report_prompt_cache(self, cache: Any) -> None:
        """This refresh's share of prompts taken from the cache, and the cache's size (metrics)."""
        if cache is None:
            return
        hits, misses = cache.take_counts()
        if hits + misses:
            self.pending_metrics["karl/refresh/prompt_cache_hit_share"] = hits / (hits + misses)
        self.pending_metrics["karl/refresh/prompt_cache_mib"] = cache.nbytes / 2**20
        self.pending_metrics["karl/refresh/prompt_cache_questions"] = float(len(cache))
