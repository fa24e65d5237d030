"""Scoring and aggregation, checked against figures worked out by hand (see conftest.CASES)."""

from __future__ import annotations

import pytest

from karl_verl.evaluation.metrics import (
    CaseResult,
    aggregate,
    best_iou,
    ground_truth_boxes,
    prediction_box,
    score_response,
)
from karl_verl.evaluation.paper import SEEN_CATEGORIES, UNSEEN_CATEGORIES


def test_every_constructed_case_scores_as_worked_out(kvg):
    for qid, (_category, _entity, boxes, response, iou, correct, parsed) in kvg.CASES.items():
        score = score_response(response, [tuple(map(float, b)) for b in boxes])
        assert score.iou == pytest.approx(iou, abs=1e-12), qid
        assert (score.correct, score.parsed) == (correct, parsed), qid


def test_iou_of_exactly_half_is_correct_just_below_is_not():
    assert score_response("<answer>(0,0),(100,50)</answer>", [(0, 0, 100, 100)]).correct
    assert not score_response("<answer>(0,0),(100,49.999)</answer>", [(0, 0, 100, 100)]).correct


def test_best_iou_over_several_ground_truth_boxes():
    assert best_iou((0, 0, 100, 100), [(200, 200, 300, 300), (0, 0, 100, 50), (0, 0, 100, 100)]) == 1.0
    assert best_iou(None, [(0, 0, 1, 1)]) == 0.0
    assert best_iou((5, 5, 5, 5), [(5, 5, 5, 5)]) == 0.0  # zero-area union: no valid IoU, a miss


@pytest.mark.parametrize(("response", "box_format", "size", "expected"), [
    ("<answer>(10,20),(30,40)</answer>", "qwen3_vl", None, (10, 20, 30, 40)),
    ('{"bbox_2d": [10, 20, 30, 40]}', "json", None, (10, 20, 30, 40)),
    ("<answer>(10,20),(30,40)</answer>", "json", None, None),  # json reads JSON only
    # Qwen2.5-VL: absolute pixels of the resized input; 280x280 stays 280x280 (a multiple of 28).
    ("<answer>[0, 0, 140, 280]</answer>", "qwen25_vl_abs", (280, 280), (0, 0, 500, 1000)),
    # The released reader: 0-1 relative values (sum < 4) are scaled by 1000.
    ("<answer>(0.1,0.2),(0.3,0.4)</answer>", "reference", None, (100, 200, 300, 400)),
    ("<answer>no box</answer>", "qwen3_vl", None, None),
    ("<answer></answer> (1,2),(3,4)", "qwen3_vl", None, None),  # the answer span wins, even when empty
])
def test_box_formats(response, box_format, size, expected):
    box = prediction_box(response, box_format, size)
    assert box == (None if expected is None else pytest.approx(expected))


def test_unknown_box_format():
    with pytest.raises(ValueError, match="box format"):
        prediction_box("x", "pixels")


def test_ground_truth_boxes():
    assert ground_truth_boxes("<|box_start|>(1,2),(3,4)<|box_end|>(5, 6), (7, 8)") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert ground_truth_boxes("no box") == []


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
