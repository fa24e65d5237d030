"""The trainer's mastery bookkeeping: current table, refresh history, schedule, diffs and metrics.

Pure module: no Ray, no verl, no torch (numpy only). The ``karl`` trainer
(:mod:`karl_verl.integration.trainer`, driver process) holds one :class:`MasteryState`, swaps its
table as a whole at each refresh, and writes it as JSON next to every verl checkpoint
(:meth:`MasteryState.save`), so that a resumed run continues with exactly the table it had.

Direction words: a level number going *down* (5 -> 4) means mastery went *up*; metrics and
:class:`TableDiff` count entities whose mastery went up / down, not level numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from karl_verl.atomic import atomic_write_text
from karl_verl.boxes import entity_of
from karl_verl.mastery import LEVEL_NAMES, NUM_LEVELS, MasteryError, MasteryTable, parse_level, read_json_file
from karl_verl.online import OnlineMastery

STATE_FORMAT = "karl-verl/mastery-state-v1"

#: Prefix of every metric this package logs through verl's logger.
METRIC_PREFIX = "karl"
#: The per-sample non-tensor field carrying the mastery level: the ``karl`` trainer puts it on every
#: prompt, verl copies it into each rollout, the reward manager and the advantage read it.
LEVEL_FIELD = "knowledge_level"


# ----------------------------------------------------------------------------- entity of a sample


def sample_entity(extra_info: Any, reward_model: Any) -> str | None:
    """The entity of a training sample: ``extra_info["entity"]``, else the ground truth's marker.

    >>> sample_entity({"entity": " Su-30 "}, None)
    'Su-30'
    >>> sample_entity({}, {"ground_truth": "<|object_ref_start|>Boeing 747<|object_ref_end|>(1,2),(3,4)"})
    'Boeing 747'
    >>> sample_entity(None, {"ground_truth": "(1,2),(3,4)"}) is None
    True
    """
    if isinstance(extra_info, Mapping):
        entity = extra_info.get("entity")
        if isinstance(entity, str) and entity.strip():
            return entity.strip()
    ground_truth = reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else reward_model
    return entity_of(ground_truth) if isinstance(ground_truth, str) else None


def sample_level(
    extra_info: Any, reward_model: Any, table: MasteryTable, default_level: int
) -> tuple[int, str | None, bool]:
    """(level, entity, known) of a training sample, as the ``karl`` trainer tags it.

    The current (refreshed) table comes first, then a level the dataset carries in
    ``extra_info["knowledge_level"]``, then ``default_level`` (``known`` is False only then).
    """
    entity = sample_entity(extra_info, reward_model)
    if entity is not None:
        level = table.level_of(entity)
        if level is not None:
            return level, entity, True
    if isinstance(extra_info, Mapping) and extra_info.get("knowledge_level") is not None:
        return parse_level(extra_info["knowledge_level"], where="extra_info['knowledge_level']"), entity, True
    return default_level, entity, False


# ----------------------------------------------------------------------------- table diff


@dataclass(frozen=True)
class TableDiff:
    """How a refresh changed the table (entities present in both, plus added / removed ones)."""

    moved_up: int = 0
    moved_down: int = 0
    unchanged: int = 0
    added: int = 0
    removed: int = 0


def diff_tables(old: MasteryTable | None, new: MasteryTable) -> TableDiff:
    """Count entities whose mastery went up (level number down), down, or stayed.

    >>> old = MasteryTable.from_scores({"a": 0.2, "b": 0.5, "c": 0.9})
    >>> new = MasteryTable.from_scores({"a": 0.5, "b": 0.2, "c": 0.95, "d": 0.0})
    >>> diff_tables(old, new)
    TableDiff(moved_up=1, moved_down=1, unchanged=1, added=1, removed=0)
    """
    old_entries = old.entries if old is not None else {}
    up = down = same = 0
    for entity, entry in new.entries.items():
        before = old_entries.get(entity)
        if before is None:
            continue
        if entry.level < before.level:
            up += 1
        elif entry.level > before.level:
            down += 1
        else:
            same += 1
    added = sum(1 for entity in new.entries if entity not in old_entries)
    removed = sum(1 for entity in old_entries if entity not in new.entries)
    return TableDiff(moved_up=up, moved_down=down, unchanged=same, added=added, removed=removed)


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class RefreshSchedule:
    """When to re-measure mastery during training (``karl.mastery.refresh_every_*``).

    ``every_steps > 0`` takes precedence over ``every_epochs``; both 0 means never. Steps are verl's
    1-based ``global_steps`` of the step about to run; step 1 is never a refresh (train begin is).

    >>> s = RefreshSchedule(every_epochs=1, every_steps=0)
    >>> [step for step in range(1, 10) if s.is_due(step, steps_per_epoch=3)]
    [4, 7]
    >>> [step for step in range(1, 10) if RefreshSchedule(0, 4).is_due(step, 3)]
    [5, 9]
    """

    every_epochs: int = 1
    every_steps: int = 0

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_epochs > 0

    @property
    def trigger(self) -> str:
        """What a scheduled refresh is called in the history: ``"step"`` or ``"epoch"``."""
        return "step" if self.every_steps > 0 else "epoch"

    def is_due(self, global_step: int, steps_per_epoch: int) -> bool:
        done = global_step - 1  # steps completed before the one about to run
        if done <= 0:
            return False
        if self.every_steps > 0:
            return done % self.every_steps == 0
        if self.every_epochs > 0 and steps_per_epoch > 0:
            return done % steps_per_epoch == 0 and (done // steps_per_epoch) % self.every_epochs == 0
        return False

    def describe(self) -> str:
        if self.every_steps > 0:
            return f"every {self.every_steps} steps"
        if self.every_epochs > 0:
            return "every epoch" if self.every_epochs == 1 else f"every {self.every_epochs} epochs"
        return "off"


# ----------------------------------------------------------------------------- history


#: RefreshRecord fields left out of its JSON while unset (None or empty).
_RECORD_FIELDS_IF_SET = ("num_skipped", "skipped_by_kind", "carried_over")


@dataclass
class RefreshRecord:
    """One entry of the refresh history (one per refresh attempt, failed ones included).

    ``trigger``: "train_begin", "epoch" or "step". ``source``: where the new table came from:
    "table_file", "probe", "online", "blend" or "none" (no table: every entity at the default
    level). ``status``: "ok" or "failed"; a failed refresh keeps the previous table and says why in
    ``error``.
    """

    step: int
    epoch: int
    trigger: str
    source: str
    status: str = "ok"
    error: str | None = None
    wall_time_s: float = 0.0
    num_entities: int = 0
    distribution: dict[str, int] = field(default_factory=dict)
    moved_up: int = 0
    moved_down: int = 0
    added: int = 0
    removed: int = 0
    num_questions: int | None = None
    num_unparseable: int | None = None
    probe_mode: str | None = None
    #: Questions the probe skipped (the backend could not answer them), and how many per reason kind.
    num_skipped: int | None = None
    skipped_by_kind: dict[str, int] = field(default_factory=dict)
    #: Probed entities none of whose questions was answered: they kept their previous entry.
    carried_over: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        # Written only when set: a state saved before these fields existed loads and saves unchanged.
        for key in _RECORD_FIELDS_IF_SET:
            if data[key] in (None, {}, []):
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: Any, *, source: str = "<memory>") -> RefreshRecord:
        if not isinstance(data, Mapping):
            raise MasteryError(f"{source}: history entry: expected an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except TypeError as err:
            raise MasteryError(f"{source}: history entry {dict(data)!r}: {err}") from None


# ----------------------------------------------------------------------------- state


@dataclass
class MasteryState:
    """Everything the trainer knows about mastery; round-trips through JSON exactly.

    ``table`` is what training uses now. ``base_table`` is the last table that came from a file or
    the probe (what "online" and "blend" build on; the same object as ``table`` with source "probe").
    ``unknown_entities`` are entities met in training but absent from the table (cumulative).
    """

    table: MasteryTable = field(default_factory=MasteryTable)
    base_table: MasteryTable | None = None
    history: list[RefreshRecord] = field(default_factory=list)
    online: OnlineMastery | None = None
    unknown_entities: set[str] = field(default_factory=set)

    @property
    def initialized(self) -> bool:
        """True once a table was set at train begin or restored from a checkpoint."""
        return bool(self.history)

    @property
    def num_failures(self) -> int:
        return sum(1 for record in self.history if not record.ok)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "table": self.table.to_json(),
            "base_table": None if self.base_table is None else self.base_table.to_json(),
            "history": [record.to_json() for record in self.history],
            "online": None if self.online is None else self.online.to_json(),
            "unknown_entities": sorted(self.unknown_entities),
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "<memory>") -> MasteryState:
        if not isinstance(data, Mapping) or data.get("format") != STATE_FORMAT:
            raise MasteryError(f"{source}: not a karl-verl mastery state (expected key 'format' = {STATE_FORMAT!r})")
        history = data.get("history", [])
        if not isinstance(history, list):
            raise MasteryError(f"{source}: key 'history' must be a list")
        base = data.get("base_table")
        online = data.get("online")
        unknown = data.get("unknown_entities") or []
        if not isinstance(unknown, list) or not all(isinstance(entity, str) for entity in unknown):
            raise MasteryError(f"{source}: key 'unknown_entities' must be a list of entity names, got {unknown!r:.200}")
        return cls(
            table=MasteryTable.from_json(data.get("table") or {}, source=f"{source}: table"),
            base_table=None if base is None else MasteryTable.from_json(base, source=f"{source}: base_table"),
            history=[RefreshRecord.from_json(item, source=source) for item in history],
            online=None if online is None else OnlineMastery.from_json(online, source=source),
            unknown_entities=set(unknown),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (JSON only): readers see the previous file or the complete new one."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MasteryState:
        return cls.from_json(read_json_file(path, "mastery state"), source=str(path))


# ----------------------------------------------------------------------------- metrics


def _key(*parts: str) -> str:
    return "/".join((METRIC_PREFIX, *parts))


def distribution_metrics(table: MasteryTable) -> dict[str, float]:
    """Entity count and share per level: ``karl/mastery/level_k/entities`` and ``.../share``."""
    counts = table.distribution()
    total = max(len(table), 1)
    out: dict[str, float] = {_key("mastery", "num_entities"): float(len(table))}
    for level, name in enumerate(LEVEL_NAMES, start=1):
        out[_key("mastery", f"level_{level}", "entities")] = float(counts[name])
        out[_key("mastery", f"level_{level}", "share")] = counts[name] / total
    return out


def refresh_metrics(record: RefreshRecord, *, failures_total: int, time_share: float | None) -> dict[str, float]:
    """Metrics logged at a refresh: outcome, probe wall time and share, questions asked, skipped and the
    answered share (``karl/refresh/skipped_questions``, ``karl/refresh/answered_share``), moves.

    ``time_share`` is the probe's wall time over (probe + the training time since the previous
    refresh), i.e. its share of an epoch if this epoch trains as long as the last one; None when
    there is no previous interval (train begin).
    """
    out = {
        _key("refresh", "ok"): 1.0 if record.ok else 0.0,
        _key("refresh", "failed"): 0.0 if record.ok else 1.0,
        _key("refresh", "failures_total"): float(failures_total),
        _key("refresh", "probe_time_s"): float(record.wall_time_s),
    }
    if record.num_questions is not None:
        out[_key("refresh", "questions")] = float(record.num_questions)
        if record.num_skipped is not None:
            # Failed refreshes too: a share below karl.mastery.min_answered_share is why they failed.
            out[_key("refresh", "skipped_questions")] = float(record.num_skipped)
            answered = record.num_questions - record.num_skipped
            out[_key("refresh", "answered_share")] = answered / record.num_questions if record.num_questions else 0.0
    if time_share is not None:
        out[_key("refresh", "probe_time_share")] = float(time_share)
    if record.ok:
        out[_key("refresh", "entities_up")] = float(record.moved_up)
        out[_key("refresh", "entities_down")] = float(record.moved_down)
        out[_key("refresh", "entities_added")] = float(record.added)
        out[_key("refresh", "entities_removed")] = float(record.removed)
    return out


def _as_float_array(values: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(f"expected {n} values (one per sample), got shape {array.shape}")
    return array


@dataclass
class LevelStats:
    """Per-level sums over the samples of one training step (several mini-batches add up).

    Metrics per level k: ``karl/level_k/count``, ``reward_mean``, ``iou_mean``, ``acc@0.5``,
    ``adv_mean`` and ``adv_abs_mean`` (GRPO makes the plain mean 0 within each group, so per-level
    advantage weights show in the mean |advantage|); a level with no sample reports only its count (0).

    >>> stats = LevelStats()
    >>> stats.add(levels=[1, 1, 5], rewards=[2.0, 0.0, 1.0], ious=[0.9, 0.1, 0.5],
    ...           accs=[1.0, 0.0, 1.0], advantages=[1.0, -1.0, 0.0])
    >>> m = stats.metrics()
    >>> m["karl/level_1/count"], m["karl/level_1/reward_mean"], m["karl/level_5/acc@0.5"], m["karl/level_3/count"]
    (2.0, 1.0, 1.0, 0.0)
    """

    count: np.ndarray = field(default_factory=lambda: np.zeros(NUM_LEVELS))
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    _QUANTITIES = ("reward_mean", "iou_mean", "acc@0.5", "adv_mean", "adv_abs_mean")

    def add(
        self,
        levels: Sequence[int] | np.ndarray,
        rewards: Sequence[float] | np.ndarray | None = None,
        ious: Sequence[float] | np.ndarray | None = None,
        accs: Sequence[float] | np.ndarray | None = None,
        advantages: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Add samples; ``levels`` 1..5; None or NaN values are left out of that quantity's mean."""
        level_index = np.asarray(levels, dtype=np.int64) - 1
        n = level_index.shape[0]
        if n and (level_index.min() < 0 or level_index.max() >= NUM_LEVELS):
            found = sorted(set((level_index + 1).tolist()))
            raise ValueError(f"levels: expected values in 1..{NUM_LEVELS}, got {found}")
        self.count += np.bincount(level_index, minlength=NUM_LEVELS)[:NUM_LEVELS]
        advantage_array = _as_float_array(advantages, n)
        abs_advantages = None if advantage_array is None else np.abs(advantage_array)
        for name, values in zip(self._QUANTITIES, (rewards, ious, accs, advantages, abs_advantages), strict=True):
            array = _as_float_array(values, n)
            if array is None:
                continue
            valid = ~np.isnan(array)
            total = np.bincount(level_index[valid], weights=array[valid], minlength=NUM_LEVELS)[:NUM_LEVELS]
            seen = np.bincount(level_index[valid], minlength=NUM_LEVELS)[:NUM_LEVELS]
            self.sums[name] = self.sums.get(name, np.zeros(NUM_LEVELS)) + total
            self.counts[name] = self.counts.get(name, np.zeros(NUM_LEVELS)) + seen

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for level in range(1, NUM_LEVELS + 1):
            out[_key(f"level_{level}", "count")] = float(self.count[level - 1])
            for name in self._QUANTITIES:
                seen = self.counts.get(name)
                if seen is not None and seen[level - 1] > 0:
                    out[_key(f"level_{level}", name)] = float(self.sums[name][level - 1] / seen[level - 1])
        return out

    @property
    def empty(self) -> bool:
        return not self.count.any()


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when it is a finite number, else None (for optional per-sample fields)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
