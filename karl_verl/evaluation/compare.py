"""Is a difference between two runs on KVG-Bench real? Paired bootstrap intervals and McNemar's exact test.

Two runs of the same benchmark are paired case by case: each case is right or wrong in run A and
in run B. For every group (each category, seen, unseen, overall, and with knowledge levels the
high and low split) the comparison gives both accuracies, their difference A - B, a paired
bootstrap confidence interval of the difference (cases resampled with replacement, the same
resample for both runs; percentile interval) and McNemar's exact test on the discordant cases
(right in one run only): the two-sided binomial test of ``a_only`` against ``a_only + b_only``
trials at one half.

The statistics are pure numpy; the accuracies compared are per-case counts, so the knowledge split
here is exact even under the released protocol (whose ``int(Num * Acc)`` recount is a property
of a reported total, not of the cases).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from karl_verl.atomic import atomic_path, atomic_write_text
from karl_verl.evaluation.paper import OVERALL_KEY, SEEN_KEY, UNSEEN_KEY
from karl_verl.mastery import HIGH_KNOWLEDGE_LEVELS

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP_SEED = 0
COMPARE_FORMAT = "karl-verl/kvg-bench-compare-v1"
# Resampled indices held at once (rows x cases): bounds memory at about 16 MB of int64.
_CHUNK_ELEMENTS = 2_000_000


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: ``min(1, 2 P[X <= min(a_only, b_only)])``, X ~ Bin(a_only + b_only, 1/2).

    >>> mcnemar_exact(10, 0)  # 2 / 2**10
    0.001953125
    >>> mcnemar_exact(0, 0)
    1.0
    """
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def paired_bootstrap_interval(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Percentile interval of ``mean(a) - mean(b)`` over ``resamples`` paired resamples of the cases."""
    a = np.asarray(correct_a, dtype=np.int8)
    b = np.asarray(correct_b, dtype=np.int8)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired runs must have the same cases, got shapes {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples: expected >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence}")
    n = a.size
    if n == 0:
        return math.nan, math.nan
    difference = a - b
    sums = np.empty(resamples, dtype=np.int64)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        sums[start:start + count] = difference[rng.integers(0, n, size=(count, n))].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(sums / n, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class RunCases:
    """One run's per-case outcome, in benchmark order."""

    label: str
    protocol: str
    question_ids: tuple[str, ...]
    categories: tuple[str, ...]
    correct: np.ndarray
    #: Knowledge level per case (None: not known); None when the run has no levels at all.
    levels: tuple[int | None, ...] | None = None
    entities: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class GroupComparison:
    """A vs B on one group of cases; accuracies and differences as fractions."""

    name: str
    n: int
    acc_a: float | None
    acc_b: float | None
    difference: float | None
    ci_low: float
    ci_high: float
    a_only: int
    b_only: int
    p_value: float

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "acc_a": self.acc_a, "acc_b": self.acc_b, "difference": self.difference,
                "ci": [_json_number(self.ci_low), _json_number(self.ci_high)], "a_only": self.a_only,
                "b_only": self.b_only, "mcnemar_p": self.p_value}


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass
class Comparison:
    """Every group's comparison: categories, the three aggregates, and the knowledge split."""

    label_a: str
    label_b: str
    protocol: str
    resamples: int
    confidence: float
    seed: int
    categories: list[GroupComparison] = field(default_factory=list)
    aggregates: list[GroupComparison] = field(default_factory=list)
    knowledge: list[GroupComparison] = field(default_factory=list)

    @property
    def groups(self) -> list[GroupComparison]:
        return [*self.categories, *self.aggregates, *self.knowledge]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": COMPARE_FORMAT,
            "run_a": self.label_a,
            "run_b": self.label_b,
            "protocol": self.protocol,
            "resamples": self.resamples,
            "confidence": self.confidence,
            "bootstrap_seed": self.seed,
            "categories": {g.name: g.to_json() for g in self.categories},
            **{g.name: g.to_json() for g in self.aggregates},
            "knowledge": {g.name: g.to_json() for g in self.knowledge} or None,
        }


def compare_group(
    name: str, correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_BOOTSTRAP_SEED,
) -> GroupComparison:
    """Compare one group. The bootstrap stream depends on ``seed`` and the group's name only, so a
    group's interval does not change when other groups are added or reordered."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    low, high = paired_bootstrap_interval(a, b, resamples=resamples, confidence=confidence, rng=rng)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = int(a.size)
    return GroupComparison(name=name, n=n, acc_a=float(a.sum()) / n if n else None,
                           acc_b=float(b.sum()) / n if n else None,
                           difference=(a_only - b_only) / n if n else None,
                           ci_low=low, ci_high=high, a_only=a_only, b_only=b_only,
                           p_value=mcnemar_exact(a_only, b_only))


def compare_runs(
    run_a: RunCases,
    run_b: RunCases,
    seen_categories: Sequence[str],
    unseen_categories: Sequence[str],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
    high_levels: frozenset[int] = HIGH_KNOWLEDGE_LEVELS,
) -> Comparison:
    """Pair the runs case by case (they must hold the same question ids and categories) and compare
    every group; the knowledge split is compared when both runs carry levels."""
    if run_a.protocol != run_b.protocol:
        raise ValueError(f"{run_a.label} was scored with the {run_a.protocol!r} protocol and {run_b.label} with "
                         f"{run_b.protocol!r}; compare runs scored the same way")
    b_index = {qid: i for i, qid in enumerate(run_b.question_ids)}
    only_a = [qid for qid in run_a.question_ids if qid not in b_index]
    only_b = sorted(set(b_index) - set(run_a.question_ids))
    if only_a or only_b:
        first = only_a[0] if only_a else only_b[0]
        raise ValueError(f"the runs are not on the same cases: question_id {first!r} is only in "
                         f"{run_a.label if only_a else run_b.label} ({len(only_a)} only in {run_a.label}, "
                         f"{len(only_b)} only in {run_b.label})")
    order = np.array([b_index[qid] for qid in run_a.question_ids], dtype=np.int64)
    categories_b = [run_b.categories[i] for i in order]
    for qid, cat_a, cat_b in zip(run_a.question_ids, run_a.categories, categories_b, strict=True):
        if cat_a != cat_b:
            raise ValueError(f"question_id {qid!r} is {cat_a!r} in {run_a.label} but {cat_b!r} in {run_b.label}")
    a = np.asarray(run_a.correct, dtype=bool)
    b = np.asarray(run_b.correct, dtype=bool)[order]
    categories = np.array(run_a.categories, dtype=object)
    settings = {"resamples": resamples, "confidence": confidence, "seed": seed}
    out = Comparison(label_a=run_a.label, label_b=run_b.label, protocol=run_a.protocol, **settings)

    known = [*seen_categories, *unseen_categories]
    present = list(dict.fromkeys(run_a.categories))
    for name in [c for c in known if c in present] + sorted(c for c in present if c not in known):
        mask = categories == name
        out.categories.append(compare_group(name, a[mask], b[mask], **settings))
    seen = np.isin(categories, list(seen_categories))
    unseen = np.isin(categories, list(unseen_categories))
    out.aggregates = [compare_group(SEEN_KEY, a[seen], b[seen], **settings),
                      compare_group(UNSEEN_KEY, a[unseen], b[unseen], **settings),
                      compare_group(OVERALL_KEY, a, b, **settings)]

    levels = _paired_levels(run_a, run_b, order)
    if levels is not None:
        known_level = np.array([level is not None for level in levels])
        high = np.array([level in high_levels for level in levels])
        for band, mask in (("high", known_level & high), ("low", known_level & ~high)):
            out.knowledge.append(compare_group(band, a[mask], b[mask], **settings))
            for domain, domain_mask in ((SEEN_KEY, seen), (UNSEEN_KEY, unseen)):
                out.knowledge.append(compare_group(f"{domain} {band}", a[mask & domain_mask], b[mask & domain_mask],
                                                   **settings))
    return out


def _paired_levels(run_a: RunCases, run_b: RunCases, order: np.ndarray) -> list[int | None] | None:
    if run_a.levels is None or run_b.levels is None:
        return None
    levels_b = [run_b.levels[i] for i in order]
    for qid, level_a, level_b in zip(run_a.question_ids, run_a.levels, levels_b, strict=True):
        if level_a != level_b:
            raise ValueError(f"question_id {qid!r} has knowledge level {level_a} in {run_a.label} but {level_b} in "
                             f"{run_b.label}; give the tables (--knowledge-dir or --mastery) to use one split")
    return list(run_a.levels)


def format_comparison(comparison: Comparison) -> str:
    """A text table in percentage points: accuracies, difference, interval, discordant counts, p-value."""
    percent = round(100 * comparison.confidence)
    header = (f"{'group':<18}{'cases':>6}{'A':>8}{'B':>8}{'A-B':>8}  {f'{percent}% CI':<17}"
              f"{'A only':>7}{'B only':>7}{'McNemar p':>11}")
    lines = [f"A = {comparison.label_a}, B = {comparison.label_b}; Acc@0.5 (%), {comparison.protocol} protocol; "
             f"paired bootstrap ({comparison.resamples} resamples, seed {comparison.seed}), McNemar exact test",
             header, "-" * len(header)]

    def cell(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"

    sections = [comparison.categories, comparison.aggregates, comparison.knowledge]
    for index, section in enumerate(s for s in sections if s):
        if index:
            lines.append("")
        for group in section:
            interval = f"[{cell(group.ci_low)}, {cell(group.ci_high)}]"
            lines.append(f"{group.name:<18}{group.n:>6}{cell(group.acc_a):>8}{cell(group.acc_b):>8}"
                         f"{cell(group.difference):>8}  {interval:<17}{group.a_only:>7}{group.b_only:>7}"
                         f"{group.p_value:>11.4g}")
    return "\n".join(lines)


def write_comparison(path: str | Path, comparison: Comparison, **context: Any) -> Path:
    data = {**comparison.to_json(), **context}
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def plot_comparison(path: str | Path, comparison: Comparison, labels: Mapping[str, str] | None = None) -> Path:
    """Per-category differences (A - B, points) with their intervals, then seen / unseen / overall; PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*comparison.categories, *comparison.aggregates]
    labels = labels or {}
    figure = Figure(figsize=(max(7.0, 0.8 * len(groups) + 2), 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = [i + (1 if i >= len(comparison.categories) else 0) for i in range(len(groups))]
    values = [math.nan if g.difference is None else 100 * g.difference for g in groups]
    lower = [0.0 if math.isnan(v) else v - 100 * g.ci_low for v, g in zip(values, groups, strict=True)]
    upper = [0.0 if math.isnan(v) else 100 * g.ci_high - v for v, g in zip(values, groups, strict=True)]
    colours = ["tab:blue" if i < len(comparison.categories) else "tab:gray" for i in range(len(groups))]
    axes.bar(positions, values, color=colours, yerr=[lower, upper], capsize=4)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(positions, [labels.get(g.name, g.name) for g in groups], rotation=30, ha="right")
    axes.set_ylabel(f"Acc@0.5 difference, points ({round(100 * comparison.confidence)}% CI)")
    axes.set_title(f"{comparison.label_a} - {comparison.label_b} on KVG-Bench ({comparison.protocol} protocol)")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)
