"""Aggregating scored benchmark cases: Acc@0.5 and mean IoU per category, seen / unseen / overall, knowledge level.

Cases are scored by :func:`karl_verl.accuracy.score_response` (KARL_METHOD.md section 6); then:

* an unparseable response and a missing prediction are both misses (IoU 0), counted apart;
* averages over several categories weight each case equally (i.e. categories by case count).

Pure module: no torch, no verl.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from karl_verl.boxes import Box
from karl_verl.mastery import HIGH_KNOWLEDGE_LEVELS, NUM_LEVELS

#: How high/low knowledge correct counts are summed (see :func:`aggregate`).
KNOWLEDGE_ARITHMETIC: tuple[str, ...] = ("exact", "released")


@dataclass
class GroupMetrics:
    """Counts over a group of cases; accuracy and mean IoU weight every case equally."""

    n: int = 0
    correct: int = 0
    iou_sum: float = 0.0
    unparseable: int = 0
    missing: int = 0

    def add(self, iou: float, correct: bool, parsed: bool, missing: bool) -> None:
        self.n += 1
        self.correct += int(correct)
        self.iou_sum += iou
        # A missing prediction is counted as missing, not also as unparseable.
        self.missing += int(missing)
        self.unparseable += int(not parsed and not missing)

    @property
    def acc(self) -> float | None:
        """Acc@0.5 as a fraction, None for an empty group."""
        return self.correct / self.n if self.n else None

    @property
    def mean_iou(self) -> float | None:
        return self.iou_sum / self.n if self.n else None

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "correct": self.correct,
            "acc": self.acc,
            "mean_iou": self.mean_iou,
            "unparseable": self.unparseable,
            "missing": self.missing,
        }


@dataclass(frozen=True)
class CaseResult:
    """A scored benchmark case."""

    question_id: str
    category: str
    entity: str | None
    iou: float
    correct: bool
    parsed: bool
    missing: bool
    box: Box | None
    level: int | None = None
    #: ``--knowledge-dir``: the table the level came from (``train``, ``trainood`` or ``testood``).
    knowledge_table: str | None = None
    #: ``--protocol released``: the number (1-9) of the box pattern that matched, 0 for none.
    pattern: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "question_id": self.question_id,
            "category": self.category,
            "entity": self.entity,
            "iou": self.iou,
            "correct": self.correct,
            "parsed": self.parsed,
            "missing": self.missing,
            # NaN and infinite coordinates (the released reader's float()) are written as strings.
            "pred_box": None if self.box is None else [v if math.isfinite(v) else repr(v) for v in self.box],
            "knowledge_level": self.level,
            "knowledge_table": self.knowledge_table,
            "pattern": self.pattern,
        }


@dataclass
class BenchMetrics:
    """Per category, seen / unseen / overall, and (with a mastery table) per knowledge level."""

    categories: dict[str, GroupMetrics] = field(default_factory=dict)
    seen: GroupMetrics = field(default_factory=GroupMetrics)
    unseen: GroupMetrics = field(default_factory=GroupMetrics)
    overall: GroupMetrics = field(default_factory=GroupMetrics)
    other_categories: list[str] = field(default_factory=list)
    #: Only with a mastery table: "high" (levels 1-3), "low" (4-5), the same per domain ("seen high",
    #: "seen low", "unseen high", "unseen low"), and per level "1".."5".
    knowledge: dict[str, GroupMetrics] | None = None
    #: How the high/low correct counts were summed: ``exact``, or ``released`` (``int(Num * Acc)``
    #: per table and level, as the released evaluator does).
    knowledge_arithmetic: str = "exact"
    #: Cases whose entity is not in the mastery table (left out of the knowledge split).
    not_in_table: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "categories": {name: group.to_json() for name, group in self.categories.items()},
            "seen": self.seen.to_json(),
            "unseen": self.unseen.to_json(),
            "overall": self.overall.to_json(),
            "other_categories": self.other_categories,
            "knowledge": None,
        }
        if self.knowledge is not None:
            out["knowledge"] = {name: group.to_json() for name, group in self.knowledge.items()}
            out["knowledge"]["not_in_table"] = self.not_in_table
            out["knowledge"]["arithmetic"] = self.knowledge_arithmetic
        return out


def aggregate(
    results: Iterable[CaseResult],
    seen_categories: Sequence[str],
    unseen_categories: Sequence[str],
    *,
    with_knowledge: bool = False,
    high_levels: Iterable[int] = HIGH_KNOWLEDGE_LEVELS,
    knowledge_arithmetic: str = "exact",
) -> BenchMetrics:
    """Group case results by category, seen / unseen, overall and (``with_knowledge``) level.

    Categories are listed seen first, then unseen (each in the order given), then any other
    category in the data (counted in ``overall`` only). With ``knowledge_arithmetic="released"``
    the high/low correct counts are the released evaluator's: per (domain, table, level) group
    ``int(n * (correct / n))``, summed.
    """
    if knowledge_arithmetic not in KNOWLEDGE_ARITHMETIC:
        raise ValueError(f"knowledge arithmetic: expected one of {KNOWLEDGE_ARITHMETIC}, got {knowledge_arithmetic!r}")
    high = frozenset(high_levels)
    metrics = BenchMetrics(knowledge_arithmetic=knowledge_arithmetic)
    cells: dict[tuple[str | None, str | None, int], GroupMetrics] = {}
    order = {name: i for i, name in enumerate([*seen_categories, *unseen_categories])}
    by_category: dict[str, GroupMetrics] = {}
    if with_knowledge:
        levels = {str(level): GroupMetrics() for level in range(1, NUM_LEVELS + 1)}
        bands = {f"{domain}{band}": GroupMetrics() for domain in ("", "seen ", "unseen ") for band in ("high", "low")}
        metrics.knowledge = {**bands, **levels}
    for result in results:
        values = (result.iou, result.correct, result.parsed, result.missing)
        by_category.setdefault(result.category, GroupMetrics()).add(*values)
        metrics.overall.add(*values)
        domain = None
        if result.category in seen_categories:
            metrics.seen.add(*values)
            domain = "seen"
        elif result.category in unseen_categories:
            metrics.unseen.add(*values)
            domain = "unseen"
        if metrics.knowledge is not None:
            if result.level is None:
                metrics.not_in_table += 1
            else:
                band = "high" if result.level in high else "low"
                metrics.knowledge[band].add(*values)
                if domain is not None:
                    metrics.knowledge[f"{domain} {band}"].add(*values)
                metrics.knowledge[str(result.level)].add(*values)
                cells.setdefault((domain, result.knowledge_table, result.level), GroupMetrics()).add(*values)
    if metrics.knowledge is not None and knowledge_arithmetic == "released":
        from karl_verl.evaluation.released import truncated_correct

        for name in ("high", "low", "seen high", "seen low", "unseen high", "unseen low"):
            domain_name, _, band = name.rpartition(" ")
            metrics.knowledge[name].correct = sum(
                truncated_correct(cell.n, cell.correct) for (domain, _table, level), cell in cells.items()
                if (level in high) == (band == "high") and domain_name in ("", domain))
    metrics.categories = dict(sorted(by_category.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    metrics.other_categories = [name for name in metrics.categories if name not in order]
    return metrics
