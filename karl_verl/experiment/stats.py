"""Per-case statistics of the experiment: validation dumps paired case by case (pure: numpy only).

verl writes one JSON line per validation case to ``trainer.validation_data_dir/<step>.jsonl`` with
the reward breakdown (``acc``, ``iou``) and the ground truth (``gts``). The world's validation
ground truths are unique, so two validations (two steps of one arm, or the same step of two arms)
pair on ``gts``. Differences get the paired bootstrap interval and McNemar's exact test of
``karl-verl eval --compare``.

With sampled validation (``val_kwargs.n`` answers per case) a dump holds ``samples`` lines per ground
truth; a case's ``acc`` and ``iou`` are their means, so a case's acc is a rate in [0, 1]. Its
differences get a bootstrap of the per-case differences and a paired sign-flip permutation test in
place of McNemar's (which needs one right-or-wrong answer per case).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from karl_verl.boxes import entity_of
from karl_verl.evaluation.compare import mcnemar_exact, paired_bootstrap_interval


@dataclass(frozen=True)
class Case:
    entity: str
    acc: float
    iou: float


def read_validation(path: str | Path, samples: int = 1) -> dict[str, Case]:
    """Ground truth -> :class:`Case` from one verl validation dump of ``samples`` answers per case (their
    mean acc and IoU); a malformed line, or a case with another number of answers, names file and line."""
    path = Path(path)
    answers: dict[str, list[Case]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            truth = record["gts"]
            case = Case(entity=entity_of(truth) or "", acc=float(record["acc"]), iou=float(record["iou"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}, line {number}: not a validation case with gts, acc and iou ({exc})") from exc
        answers.setdefault(truth, []).append(case)
        if len(answers[truth]) > samples:
            raise ValueError(f"{path}, line {number}: ground truth {truth!r} appears {len(answers[truth])} times, "
                             f"expected {samples} (answers per case); cases cannot be paired")
    short = [truth for truth, got in answers.items() if len(got) != samples]
    if short:
        raise ValueError(f"{path}: {len(short)} ground truth(s) with fewer than {samples} answers, e.g. {short[0]!r}")
    return {truth: Case(entity=got[0].entity, acc=float(np.mean([c.acc for c in got])),
                        iou=float(np.mean([c.iou for c in got]))) for truth, got in answers.items()}


def sign_flip_p(differences: np.ndarray, *, resamples: int = 10_000, rng: np.random.Generator) -> float:
    """Two-sided p of a paired sign-flip permutation test of mean(differences) = 0 (1.0 when all are 0).

    >>> sign_flip_p(np.zeros(5), rng=np.random.default_rng(0))
    1.0
    """
    observed = abs(float(differences.mean()))
    if observed == 0.0:
        return 1.0
    signs = rng.choice((-1.0, 1.0), size=(resamples, len(differences)))
    extreme = int((np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12).sum())
    return (extreme + 1) / (resamples + 1)


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` over paired cases, its bootstrap interval and a p-value (acc only).

    ``p_mcnemar`` is McNemar's exact p when every case has one answer (right or wrong), else the
    sign-flip permutation p of the per-case differences (sampled validation); ``p_test`` names it.
    """

    metric: str
    group: str
    cases: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    p_mcnemar: float | None
    p_test: str = "McNemar"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    def format(self) -> str:
        p = "" if self.p_mcnemar is None else f", {self.p_test} p={self.p_mcnemar:.3g}"
        return (f"{self.metric} {self.group}: {self.mean_b:.3f} -> {self.mean_a:.3f}, "
                f"{self.difference:+.3f} [95% CI {self.low:+.3f}, {self.high:+.3f}] (n={self.cases}{p})")


def paired_difference(a: Mapping[str, Case], b: Mapping[str, Case], *, metric: str = "acc", group: str = "all",
                      keep: Mapping[str, bool] | None = None, resamples: int = 10_000, seed: int = 0) -> Difference:
    """Paired ``a - b`` over the ground truths both hold (and ``keep[entity]``, when given)."""
    if set(a) != set(b):
        raise ValueError(f"the two validations hold different cases ({len(set(a) ^ set(b))} unpaired)")
    truths = sorted(t for t in a if keep is None or keep.get(a[t].entity, False))
    values_a = np.array([getattr(a[t], metric) for t in truths], dtype=float)
    values_b = np.array([getattr(b[t], metric) for t in truths], dtype=float)
    if not truths:
        return Difference(metric, group, 0, math.nan, math.nan, math.nan, math.nan, math.nan, None)
    rng = np.random.default_rng(seed)
    binary = bool(np.isin(values_a, (0.0, 1.0)).all() and np.isin(values_b, (0.0, 1.0)).all())
    p_test = "McNemar"
    if metric == "acc" and binary:
        low, high = paired_bootstrap_interval(values_a >= 0.5, values_b >= 0.5, resamples=resamples, rng=rng)
        p = mcnemar_exact(int(((values_a >= 0.5) & (values_b < 0.5)).sum()),
                          int(((values_a < 0.5) & (values_b >= 0.5)).sum()))
    else:
        diffs = values_a - values_b
        means = np.array([diffs[rng.integers(0, len(diffs), len(diffs))].mean() for _ in range(resamples)])
        low, high = (float(q) for q in np.quantile(means, [0.025, 0.975]))
        p, p_test = (sign_flip_p(diffs, resamples=resamples, rng=rng), "sign-flip") if metric == "acc" else (None, "")
    return Difference(metric, group, len(truths), float(values_a.mean()), float(values_b.mean()),
                      float(values_a.mean() - values_b.mean()), low, high, p, p_test)


def by_level(a: Mapping[str, Case], b: Mapping[str, Case], levels: Mapping[str, int], *, metric: str = "acc",
             level_names: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0) -> list[Difference]:
    """:func:`paired_difference` overall and for each level of ``levels`` (entity -> level) that has cases."""
    out = [paired_difference(a, b, metric=metric, seed=seed)]
    for level in level_names:
        keep = {entity: lv == level for entity, lv in levels.items()}
        difference = paired_difference(a, b, metric=metric, group=f"level_{level}", keep=keep, seed=seed)
        if difference.cases:
            out.append(difference)
    return out


def mean_by_level(cases: Mapping[str, Case], levels: Mapping[str, int], metric: str = "acc") -> dict[str, float]:
    """Mean ``metric`` overall (``all``) and per ``level_k`` (entity levels from ``levels``)."""
    groups: dict[str, list[float]] = {"all": []}
    for case in cases.values():
        value = getattr(case, metric)
        groups["all"].append(value)
        if case.entity in levels:
            groups.setdefault(f"level_{levels[case.entity]}", []).append(value)
    return {name: float(np.mean(values)) for name, values in sorted(groups.items()) if values}
