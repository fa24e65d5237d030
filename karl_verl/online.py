"""Online mastery (beyond the paper): a per-entity Beta posterior over acc@0.5 from training rollouts.

Pure module: no Ray, no verl, no torch. The ``karl`` trainer (driver process) feeds it the outcome of
every training rollout and turns it into a mastery table at each refresh
(``karl.mastery.source = "online"`` or ``"blend"``, see :class:`karl_verl.config.MasteryConfig`).

Model. Each training rollout of entity e is a Bernoulli trial "IoU >= 0.5" (the reward's ``acc``).
With a Beta(a0, b0) prior, after s successes and f failures the posterior is Beta(a0 + s, b0 + f) and
the online estimate of e's acc@0.5 is its mean ``(a0 + s) / (a0 + b0 + s + f)``. At every refresh the
counts decay, ``s, f <- decay * s, decay * f``: an observation made k refreshes ago weighs
``decay ** k``, so the estimate follows the policy as it learns instead of averaging over the whole run.

Turning estimates into levels. The same thresholds as the probe map an accuracy to a level
(:func:`karl_verl.mastery.level_from_accuracy`). Note what that means: the probe measures
*recognition* (4-choice questions, chance 0.25) while the online estimate measures *grounding*
(acc@0.5 of the policy's boxes); the two are related but not the same quantity, so an entity's
online level is a different reading of "mastery" than the paper's.

* ``online``: an entity with enough evidence (``min_evidence`` decayed observations) gets the level of
  its posterior mean; the others keep their level from the base table (loaded or probed at train begin).
* ``blend``: score = (1 - w) * probe accuracy + w * posterior mean, where w = ``online_weight``; an
  entity without enough online evidence keeps its probe accuracy, one never probed uses the online
  mean alone. A table entry that has a level but no score (the released JSON files) stands for the
  midpoint of its level's accuracy interval (:func:`level_midpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from karl_verl.mastery import (
    DEFAULT_THRESHOLDS,
    NUM_LEVELS,
    MasteryEntry,
    MasteryError,
    MasteryTable,
    level_from_accuracy,
)

#: Reward key read as the Bernoulli outcome of a rollout (1.0 if IoU >= 0.5, see karl_verl.reward).
SUCCESS_KEY = "acc"


@dataclass
class BetaCounts:
    """Decayed success / failure counts of one entity (the prior is not included)."""

    successes: float = 0.0
    failures: float = 0.0

    @property
    def total(self) -> float:
        return self.successes + self.failures


@dataclass
class OnlineMastery:
    """Per-entity Beta posterior over acc@0.5, with decay applied at each refresh.

    >>> online = OnlineMastery(prior_alpha=1.0, prior_beta=1.0, decay=0.5)
    >>> online.observe(["Su-30", "Su-30", "Su-30", None], [1.0, 1.0, 0.0, 1.0])
    3
    >>> online.mean("Su-30"), online.evidence("Su-30")
    (0.6, 3.0)
    >>> online.apply_decay(); online.evidence("Su-30")
    1.5
    """

    prior_alpha: float = 1.0
    prior_beta: float = 1.0
    decay: float = 0.9
    counts: dict[str, BetaCounts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.prior_alpha > 0 and self.prior_beta > 0):
            raise MasteryError(
                f"online prior: expected alpha > 0 and beta > 0, got ({self.prior_alpha}, {self.prior_beta})"
            )
        if not 0.0 < self.decay <= 1.0:
            raise MasteryError(f"online decay: expected a number in (0, 1], got {self.decay}")

    def observe(self, entities: Sequence[str | None], successes: Sequence[float]) -> int:
        """Add one Bernoulli outcome per rollout; entities that are None or empty are skipped.

        ``successes`` are read as booleans with threshold 0.5 (the reward's ``acc`` is 0.0 or 1.0).
        Returns the number of outcomes recorded.
        """
        if len(entities) != len(successes):
            raise ValueError(f"observe: expected one outcome per entity, got {len(entities)} entities "
                             f"and {len(successes)} outcomes")
        used = 0
        for entity, outcome in zip(entities, successes, strict=True):
            if not entity or outcome is None:
                continue
            value = float(outcome)
            if math.isnan(value):
                continue
            counts = self.counts.setdefault(entity.strip(), BetaCounts())
            if value >= 0.5:
                counts.successes += 1.0
            else:
                counts.failures += 1.0
            used += 1
        return used

    def apply_decay(self) -> None:
        """Multiply every count by ``decay`` (called once per refresh, after the table is computed)."""
        for counts in self.counts.values():
            counts.successes *= self.decay
            counts.failures *= self.decay

    def evidence(self, entity: str) -> float:
        """Decayed number of observations of ``entity`` (0.0 if never seen)."""
        counts = self.counts.get(entity.strip())
        return 0.0 if counts is None else counts.total

    def mean(self, entity: str) -> float | None:
        """Posterior mean of ``entity``'s acc@0.5, or None if it was never observed."""
        counts = self.counts.get(entity.strip())
        if counts is None or counts.total <= 0.0:
            return None
        alpha = self.prior_alpha + counts.successes
        beta = self.prior_beta + counts.failures
        return alpha / (alpha + beta)

    def entities(self) -> list[str]:
        return sorted(self.counts)

    def to_json(self) -> dict[str, Any]:
        return {
            "prior_alpha": self.prior_alpha,
            "prior_beta": self.prior_beta,
            "decay": self.decay,
            "counts": {entity: [c.successes, c.failures] for entity, c in sorted(self.counts.items())},
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "<memory>") -> OnlineMastery:
        if not isinstance(data, Mapping):
            raise MasteryError(f"{source}: online posterior: expected an object, got {type(data).__name__}")
        try:
            counts = {
                str(entity): BetaCounts(float(pair[0]), float(pair[1]))
                for entity, pair in dict(data.get("counts") or {}).items()
            }
            return cls(
                prior_alpha=float(data.get("prior_alpha", 1.0)),
                prior_beta=float(data.get("prior_beta", 1.0)),
                decay=float(data.get("decay", 0.9)),
                counts=counts,
            )
        except (TypeError, ValueError, IndexError, KeyError, OverflowError) as err:
            raise MasteryError(
                f"{source}: online posterior: expected counts as [successes, failures] pairs ({err!r})"
            ) from None


def level_midpoint(level: int, thresholds: Iterable[float] = DEFAULT_THRESHOLDS) -> float:
    """The accuracy a level stands for when no score is known: the middle of its interval.

    >>> [round(level_midpoint(k), 3) for k in range(1, 6)]
    [0.85, 0.575, 0.375, 0.2, 0.05]
    """
    bounds = (1.0, *(float(t) for t in thresholds), 0.0)
    if len(bounds) != NUM_LEVELS + 1 or not 1 <= level <= NUM_LEVELS:
        raise MasteryError(f"level_midpoint: expected a level 1..5 and 4 thresholds, got {level}, {bounds[1:-1]}")
    return (bounds[level - 1] + bounds[level]) / 2.0


def entry_score(entry: MasteryEntry, thresholds: Iterable[float] = DEFAULT_THRESHOLDS) -> float:
    """An entry's accuracy: its measured score, else the midpoint of its level."""
    return entry.score if entry.score is not None else level_midpoint(entry.level, thresholds)


def online_table(
    online: OnlineMastery,
    base: MasteryTable | None,
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    min_evidence: float = 1.0,
    epoch: int | None = None,
) -> MasteryTable:
    """Mastery from training rollouts alone; entities with too little evidence keep their base entry."""
    thresholds = tuple(thresholds)
    entries = dict(base.entries) if base is not None else {}
    for entity in online.entities():
        mean = online.mean(entity)
        if mean is None or online.evidence(entity) < min_evidence:
            continue
        entries[entity] = MasteryEntry(level=level_from_accuracy(mean, thresholds), score=mean, epoch=epoch)
    return MasteryTable(entries=entries, meta={"source": "online"})


def blend_table(
    probe: MasteryTable | None,
    online: OnlineMastery,
    *,
    weight: float,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    min_evidence: float = 1.0,
    epoch: int | None = None,
) -> MasteryTable:
    """Blend probe accuracy and online acc@0.5 per entity: ``(1 - weight) * probe + weight * online``.

    >>> probe = MasteryTable.from_scores({"a": 0.8, "b": 0.2})
    >>> online = OnlineMastery(); _ = online.observe(["a"] * 8, [0.0] * 8)
    >>> table = blend_table(probe, online, weight=0.5, min_evidence=4)
    >>> round(table.get("a").score, 3), table.level_of("a"), table.level_of("b")
    (0.45, 2, 4)
    """
    if not 0.0 <= weight <= 1.0:
        raise MasteryError(f"blend weight: expected a number in [0, 1], got {weight}")
    thresholds = tuple(thresholds)
    probe_entries = probe.entries if probe is not None else {}
    entries: dict[str, MasteryEntry] = {}
    for entity in sorted(set(probe_entries) | set(online.entities())):
        base = probe_entries.get(entity)
        mean = online.mean(entity) if online.evidence(entity) >= min_evidence else None
        if mean is None:
            if base is not None:
                entries[entity] = base
            continue
        score = mean if base is None else (1.0 - weight) * entry_score(base, thresholds) + weight * mean
        entries[entity] = MasteryEntry(
            level=level_from_accuracy(score, thresholds),
            score=score,
            num_questions=None if base is None else base.num_questions,
            epoch=epoch,
        )
    return MasteryTable(entries=entries, meta={"source": "blend", "online_weight": weight})
