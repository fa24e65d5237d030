"""Aggregation and the constructed cases' scores, checked against figures worked out by hand (conftest.CASES)."""

from __future__ import annotations

import pytest

from karl_verl.accuracy import score_response
from karl_verl.evaluation.metrics import CaseResult, aggregate
from karl_verl.evaluation.paper import SEEN_CATEGORIES, UNSEEN_CATEGORIES


def test_every_constructed_case_scores_as_worked_out(kvg):
    for qid, (_category, _entity, boxes, response, iou, correct, parsed) in kvg.CASES.items():
        score = score_response(response, [tuple(map(float, b)) for b in boxes])
        assert score.iou == pytest.approx(iou, abs=1e-12), qid
        assert (score.correct, score.parsed) == (correct, parsed), qid


def _results(kvg, with_levels: bool) -> list[CaseResult]:
    results = []
    for qid, (category, entity, boxes, response, *_rest) in kvg.CASES.items():
        score = score_response(response, [tuple(map(float, b)) for b in boxes])
        results.append(CaseResult(qid, category, entity, score.iou, score.correct, score.parsed, response is None,
                                  score.box, kvg.LEVELS.get(entity) if with_levels else None))
    return results


def test_aggregates_match_hand_computed_figures(kvg):
    metrics = aggregate(_results(kvg, False), SEEN_CATEGORIES, UNSEEN_CATEGORIES)
    by = {name: group.to_json() for name, group in metrics.categories.items()}
    assert list(by) == ["aircraft", "car", "bird", "dog", "flower", "landmark"]  # Table 1 order
    assert by["aircraft"] == {"n": 3, "correct": 2, "acc": pytest.approx(2 / 3), "mean_iou": pytest.approx(1.99 / 3),
                              "unparseable": 0, "missing": 0}
    assert by["car"] == {"n": 2, "correct": 1, "acc": 0.5, "mean_iou": 0.5, "unparseable": 0, "missing": 1}
    assert by["bird"] == {"n": 1, "correct": 0, "acc": 0.0, "mean_iou": 0.0, "unparseable": 1, "missing": 0}
    assert by["dog"]["acc"] == 0.5 and by["dog"]["mean_iou"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert by["landmark"]["acc"] == 1.0
    # Seen: 3 of 6 correct; unseen: 3 of 5; overall weighted by cases: 6 of 11 (not the mean of 0.5 and 0.6).
    assert metrics.seen.to_json() == {"n": 6, "correct": 3, "acc": 0.5, "mean_iou": pytest.approx(2.99 / 6),
                                      "unparseable": 1, "missing": 1}
    assert (metrics.unseen.n, metrics.unseen.correct, metrics.unseen.acc) == (5, 3, 0.6)
    assert metrics.unseen.mean_iou == pytest.approx((1 / 3 + 0.5 + 0 + 1 + 1) / 5)
    assert (metrics.overall.n, metrics.overall.correct) == (11, 6)
    assert metrics.overall.acc == pytest.approx(6 / 11)
    assert metrics.overall.mean_iou == pytest.approx((1.99 + 1 + 0 + 1 / 3 + 0.5 + 0 + 2) / 11)
    assert metrics.knowledge is None and metrics.other_categories == []


def test_knowledge_split_matches_hand_computed_figures(kvg):
    metrics = aggregate(_results(kvg, True), SEEN_CATEGORIES, UNSEEN_CATEGORIES, with_knowledge=True)
    high, low = metrics.knowledge["high"], metrics.knowledge["low"]
    # high (levels 1-3): q1 q2 q5 q8 q10 -> 4 correct; low (4-5): q3 q4 q7 q9 q11 -> 2 correct; q6 not in table.
    assert (high.n, high.correct, high.acc, high.mean_iou) == (5, 4, 0.8, pytest.approx(3.0 / 5))
    assert (low.n, low.correct, low.acc) == (5, 2, 0.4)
    assert low.mean_iou == pytest.approx((0.49 + 1 + 1 / 3 + 0 + 1) / 5)
    assert metrics.not_in_table == 1
    assert [(metrics.knowledge[str(k)].n, metrics.knowledge[str(k)].correct) for k in range(1, 6)] == [
        (2, 2), (2, 2), (1, 0), (3, 1), (2, 1)]
    assert metrics.to_json()["knowledge"]["not_in_table"] == 1


def test_categories_outside_the_split_count_in_overall_only():
    results = [CaseResult("a", "aircraft", None, 1.0, True, True, False, None),
               CaseResult("b", "insect", None, 0.0, False, True, False, None)]
    metrics = aggregate(results, SEEN_CATEGORIES, UNSEEN_CATEGORIES)
    assert metrics.other_categories == ["insect"]
    assert (metrics.seen.n, metrics.unseen.n, metrics.overall.n) == (1, 0, 2)
    assert metrics.unseen.acc is None and metrics.unseen.to_json()["mean_iou"] is None
