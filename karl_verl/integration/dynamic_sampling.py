"""Dynamic sampling (DAPO's group filter) with KARL's bookkeeping: what was dropped, at which level.

verl 0.9.1 filters groups in its v1 replay buffer (``algorithm.filter_groups.{enable, metric}``):
a finished group whose ``metric`` is the same for every rollout is evicted and replaced by fresh
prompts. With the ``karl`` reward manager the right metric is ``success`` (the KA-IoU term's
success branch, see :func:`karl_verl.reward.score_response`): a group where every rollout succeeds
or every rollout fails has zero GRPO advantage. ``reward`` is the wrong metric: the format term
differs between rollouts of an all-failure group, so such groups pass the filter and waste a slot.

:class:`KarlReplayBuffer` is verl's sync replay buffer plus:

* per group it drops, the group's mastery level and shared value (``karl/filter/level_k/*``);
* a generation budget: verl's v1 buffer ignores ``algorithm.filter_groups.max_num_gen_batches`` and
  refills until enough groups pass, forever if none does (a model that solves nothing). Here, once a
  step has generated ``max_num_gen_batches`` batches of prompts, filtering stops for the rest of that
  step: the batch is filled from the finished groups, those with a learning signal first, then
  constant ones (zero advantage); a warning is logged and ``karl/filter/budget_exhausted`` is 1.
  Non-positive: no budget (verl's behaviour).

Runs in verl's TaskRunner (the trainer's process, CPU); nothing here touches the GPUs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import FILTER_GROUPS_REWARD_METRIC, ReplayBuffer

from karl_verl.mastery import LEVEL_NAMES, parse_level
from karl_verl.mastery_state import LEVEL_FIELD
from karl_verl.reward import SUCCESS_FIELD

logger = logging.getLogger(__name__)

#: Breakdown keys whose shared value says whether a dropped group was all-success or all-failure.
BINARY_METRICS = (SUCCESS_FIELD, "acc")


def filter_metric(config: Any) -> str | None:
    """``algorithm.filter_groups.metric`` when the group filter is on, else None."""
    filter_groups = config.algorithm.get("filter_groups", None)
    if filter_groups is None or not filter_groups.get("enable", False):
        return None
    return filter_groups.get("metric", None)


#: The start of verl's warning (``PPOTrainer._resolve_filter_groups_metric``) that its v1 buffer ignores the budget.
VERL_BUDGET_WARNING = "algorithm.filter_groups.max_num_gen_batches="


class HeldBudgetWarning(logging.Filter):
    """Holds back verl's "max_num_gen_batches is ignored" warning while the replay buffer is built.

    verl logs it whenever the budget is set, also when the karl trainer goes on to honour the budget
    (:class:`KarlReplayBuffer`), where it would tell the user the opposite of what happens. The
    trainer installs this filter around verl's ``_build_replay_buffer`` and then either says once
    that the budget is honoured, or, when it does not specialise the buffer, lets verl's warning
    out as it was (:meth:`release`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(VERL_BUDGET_WARNING):
            self.held.append(record)
            return False
        return True

    def release(self, target: logging.Logger) -> None:
        """Log the held records on ``target`` as verl would have."""
        for record in self.held:
            target.handle(record)
        self.held.clear()


def group_of(key: str) -> str:
    """The prompt uid of a trajectory key ``{uid}_{session}_{index}`` (verl's key format)."""
    return key.split("_")[0]


class KarlReplayBuffer(ReplayBuffer):
    """verl's sync :class:`ReplayBuffer` that records the level of every group it drops and bounds the
    prompts one step may generate. Built by :meth:`specialise` from the buffer verl built."""

    karl_max_gen_batches: int
    karl_dropped: Counter
    karl_budget_exhausted: int
    #: Called with (partition id, trajectory keys) of the groups about to be dropped, while their rows
    #: are still in TransferQueue: the trainer counts their outcomes (online mastery, curriculum),
    #: which would otherwise only ever see the groups the filter keeps.
    karl_observe_dropped: Callable[[str, list[str]], None] | None

    @classmethod
    def specialise(cls, buffer: ReplayBuffer, *, max_gen_batches: int) -> KarlReplayBuffer:
        """Turn verl's own buffer into this class, keeping every setting verl gave it.

        verl builds its buffer from a dozen trainer settings (``PPOTrainer._build_replay_buffer``);
        re-deriving them here would drift from verl, so the instance verl built is kept and given
        this class, which adds state and overrides but no constructor.
        """
        if type(buffer) is not ReplayBuffer:
            raise TypeError(f"expected verl's sync ReplayBuffer, got {type(buffer).__name__}")
        buffer.__class__ = cls
        assert isinstance(buffer, cls)
        buffer.karl_max_gen_batches = int(max_gen_batches)
        buffer.karl_dropped = Counter()
        buffer.karl_budget_exhausted = 0
        buffer.karl_observe_dropped = None
        buffer._karl_refilled = 0
        buffer._karl_filtering = True
        refill = buffer.refill_fn

        def counted_refill(num_prompts: int) -> int:
            buffer._karl_refilled += num_prompts
            return refill(num_prompts)

        buffer.refill_fn = counted_refill
        return buffer

    def _karl_budget_left(self) -> bool:
        if self.karl_max_gen_batches <= 0 or not self.train_batch_size:
            return True
        generated = self.train_batch_size + self._karl_refilled
        return generated < self.karl_max_gen_batches * self.train_batch_size

    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[Any, dict]:
        self._karl_refilled = 0
        self._karl_filtering = True
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        return batch, metrics

    def _dapo_filtered_keys(self, partition_id: str) -> tuple[set[str], Counter]:
        # Classified either way: once the budget is spent, constant groups stay but go last (below).
        filtered, counts = super()._dapo_filtered_keys(partition_id)
        if partition_id == "val":
            return filtered, counts
        if self._karl_filtering and not self._karl_budget_left():
            self._karl_filtering = False
            self.karl_budget_exhausted += 1
            logger.warning("karl: dynamic sampling generated %d prompts for %d groups this step "
                           "(algorithm.filter_groups.max_num_gen_batches=%d); the rest of the step is filled "
                           "without filtering, groups with a learning signal first",
                           self.train_batch_size + self._karl_refilled, self.train_batch_size,
                           self.karl_max_gen_batches)
        return (filtered, counts) if self._karl_filtering else (set(), Counter())

    def _select_prompt_uids(self, partition_id: str, sampleable_keys: set[str],
                            batch_size: int) -> tuple[list[str], dict[str, dict], dict[str, int]]:
        ordered, partitions, steps = super()._select_prompt_uids(partition_id, sampleable_keys, len(sampleable_keys))
        if not self._karl_filtering:
            # Stable sort: within each kind verl's order (oldest prompts first) stays.
            cache = self._dapo_classification_cache[partition_id]
            ordered = sorted(ordered, key=lambda uid: cache.get(uid) is not None)
        return ordered[:batch_size], partitions, steps

    def _evict_terminal_groups(self, global_steps: int, partition_id: str,
                               eviction_reasons: tuple[set[str], set[str], set[str], Counter]) -> Any:
        dropped = eviction_reasons[1]
        if dropped and partition_id != "val":
            self._karl_record_dropped(partition_id, dropped)
        return super()._evict_terminal_groups(global_steps, partition_id, eviction_reasons)

    def _karl_record_dropped(self, partition_id: str, uids: set[str]) -> None:
        """Count the dropped groups by (level, shared metric value); one TransferQueue read per poll."""
        first_key: dict[str, str] = {}
        for key in self.partitions[partition_id]:
            first_key.setdefault(group_of(key), key)
        if self.karl_observe_dropped is not None:
            rows = [key for key in self.partitions[partition_id] if group_of(key) in uids]
            if rows:
                self.karl_observe_dropped(partition_id, rows)
        uids_with_rows = sorted(uid for uid in uids if uid in first_key)
        levels: list[Any] = [None] * len(uids_with_rows)
        if uids_with_rows:
            try:
                data = tq.kv_batch_get(keys=[first_key[uid] for uid in uids_with_rows], partition_id=partition_id,
                                       select_fields=[LEVEL_FIELD])
                levels = list(data[LEVEL_FIELD])
            except (KeyError, ValueError):  # a custom agent loop that dropped the field
                pass
        cache = self._dapo_classification_cache[partition_id]
        for uid, level in zip(uids_with_rows, levels, strict=True):
            number = parse_level(_scalar(level), where=f"{LEVEL_FIELD} of group {uid}") if level is not None else 0
            self.karl_dropped[(number, cache.get(uid))] += 1

    def karl_take_dropped(self) -> tuple[Counter, int]:
        """The dropped-group counts and budget exhaustions since the last call, then reset."""
        dropped, exhausted = self.karl_dropped, self.karl_budget_exhausted
        self.karl_dropped, self.karl_budget_exhausted = Counter(), 0
        return dropped, exhausted


def _scalar(value: Any) -> Any:
    value = getattr(value, "data", value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def constant_groups(keys: Sequence[str], values: Iterable[float | None], valid: Iterable[bool]) -> int:
    """How many groups among these rows have one value for every rollout (the groups the filter drops).

    Rows without a value (None) and padding rows (``valid`` False) are left out; a group of one row
    is not constant (verl's filter needs two rollouts to compare).
    """
    groups: dict[str, list[float]] = {}
    for key, value, ok in zip(keys, values, valid, strict=True):
        if ok and value is not None:
            groups.setdefault(group_of(key), []).append(float(value))
    return sum(1 for rows in groups.values() if len(rows) > 1 and float(np.std(rows)) == 0.0)


def filter_metrics(metric: str, dropped: Counter, refilled: Counter, exhausted: int,
                   trained_constant: int) -> dict[str, float]:
    """``karl/filter/*`` for one step.

    ``dropped`` maps (level, shared value) to groups; ``refilled`` maps level to prompts generated to
    replace dropped groups (verl's sync buffer refills twice what it drops, as DAPO does);
    ``trained_constant`` is the number of constant groups in the trained batch (0 unless the budget
    ran out).
    """
    out: dict[str, float] = {}
    binary = metric in BINARY_METRICS
    for level in range(1, len(LEVEL_NAMES) + 1):
        prefix = f"karl/filter/level_{level}"
        out[f"{prefix}/dropped_groups"] = float(sum(n for (lv, _), n in dropped.items() if lv == level))
        if binary:
            out[f"{prefix}/dropped_all_success"] = float(sum(n for (lv, v), n in dropped.items()
                                                             if lv == level and v is not None and v > 0))
            out[f"{prefix}/dropped_all_failure"] = float(sum(n for (lv, v), n in dropped.items()
                                                             if lv == level and v is not None and v <= 0))
        out[f"{prefix}/refilled_prompts"] = float(refilled.get(level, 0))
    out["karl/filter/dropped_groups"] = float(sum(dropped.values()))
    out["karl/filter/refilled_prompts"] = float(sum(refilled.values()))
    out["karl/filter/budget_exhausted"] = float(exhausted)
    out["karl/filter/trained_constant_groups"] = float(trained_constant)
    return out


def row_metric_values(metric: str, infos: Sequence[dict], rewards: Sequence[float]) -> list[float | None]:
    """Each row's value of the filter metric: the reward (verl's canonical ``rm_scores`` sum) or a
    breakdown key."""
    if metric == FILTER_GROUPS_REWARD_METRIC:
        return [float(r) for r in rewards]
    return [None if info.get(metric) is None else float(info[metric]) for info in infos]

