"""The released evaluator's rules: hand-worked cases for every quirk, and property tests against the
independent oracle in ``tests/_support/released_evaluator.py`` on adversarial responses."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import released_evaluator as oracle
from hypothesis import example, given, settings
from hypothesis import strategies as st

from karl_verl.accuracy import ground_truth_boxes
from karl_verl.accuracy import score_response as karl_score
from karl_verl.evaluation import released

SQUARE_GT = "<|object_ref_start|>Su-30<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|>"
FULL_GT = "<|object_ref_start|>Su-30<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>"


def released_case(response: str, gt: str) -> released.ReleasedScore:
    return released.score_response(response, released.ground_truth_box(gt))


def karl_case(response: str, gt: str):
    return karl_score(response, ground_truth_boxes(gt))


# ---------------------------------------------------------------------------------------------
# Ground truth


def test_only_the_first_integer_ground_truth_box_counts():
    gt = SQUARE_GT + "<|box_start|>(500,500),(600,600)<|box_end|>"
    response = "<answer>(500,500),(600,600)</answer>"
    assert released_case(response, gt).iou == 0.0
    assert karl_case(response, gt).iou == 1.0  # ours takes the best over both boxes


def test_a_decimal_ground_truth_box_is_skipped_for_the_next_integer_one():
    gt = "<|box_start|>(0.5,0),(10,10)<|box_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    assert released.ground_truth_box(gt) == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize("gt, reason", [
    ("<|object_ref_start|>A<|object_ref_end|>(0,0),(100,100)", "no integer ground-truth box"),
    ("<|box_start|>(0.5,0),(10,10)<|box_end|>", "no integer ground-truth box"),
    ("<|box_start|>(,0),(10,10)<|box_end|>", "empty coordinate"),
])
def test_ground_truth_without_an_integer_box_is_an_error(gt, reason):
    with pytest.raises(ValueError, match=reason):
        released.ground_truth_box(gt)


def test_entity_is_the_first_marker_as_written():
    assert released.ground_truth_entity("<|object_ref_start|> Su-30 <|object_ref_end|>") == " Su-30 "
    with pytest.raises(ValueError, match="no entity"):
        released.ground_truth_entity("<|box_start|>(1,2),(3,4)<|box_end|>")


# ---------------------------------------------------------------------------------------------
# Answer text and box: one example per rule, each worked out by hand in the comment beside it.


def test_multi_line_answer_lets_so_the_answer_is_in_the_reasoning_win():
    # The span crosses line breaks, so the whole response is read, and pattern 2 comes first.
    response = "<think>So the answer is (500,500),(600,600)? No.</think><answer>\n(0,0),(100,100)\n</answer>"
    score = released_case(response, SQUARE_GT)
    assert (score.box, score.pattern, score.iou, score.correct) == ((500.0, 500.0, 600.0, 600.0), 2, 0.0, False)
    assert karl_case(response, SQUARE_GT).correct


def test_prose_in_parentheses_makes_pattern_4_win_and_float_fail():
    # Pattern 3 needs "),(" with no space; pattern 4 then pairs "(brown dog, left)" with "(12, 40)",
    # float("brown dog") fails and the box falls back to zeros.
    response = "<answer>(brown dog, left) (0, 0), (100, 100)</answer>"
    score = released_case(response, SQUARE_GT)
    assert (score.box, score.pattern, score.iou) == ((0, 0, 0, 0), 4, 0.0)
    assert karl_case(response, SQUARE_GT).correct


def test_the_first_json_fence_wins_over_the_real_answer():
    response = ('<think>not this: ```json\n{"bbox_2d": [500, 500, 600, 600]}\n```</think>\n'
                '<answer>\n```json\n{"bbox_2d": [0, 0, 100, 100]}\n```\n</answer>')
    score = released_case(response, SQUARE_GT)
    assert (score.box, score.pattern, score.iou) == ((500.0, 500.0, 600.0, 600.0), 5, 0.0)


def test_json_fence_inside_a_one_line_answer():
    response = '<answer>```json [{"bbox_2d": [0, 0, 100, 100]}] ``` </answer>'
    assert released.answer_text(response) == ' [{"bbox_2d": [0, 0, 100, 100]}] '
    assert released_case(response, SQUARE_GT).pattern == 5


def test_last_match_of_the_winning_pattern():
    response = "<answer>(500,500),(600,600) or rather (0,0),(100,100)</answer>"
    assert released_case(response, SQUARE_GT).box == (0.0, 0.0, 100.0, 100.0)


def test_a_sum_below_4_multiplies_by_1000():
    # Decimals need pattern 4: 0.1 + 0.1 + 0.2 + 0.2 < 4 -> (100, 100, 200, 200).
    assert released_case("<answer>(0.1,0.1),(0.2,0.2)</answer>", SQUARE_GT).box == (100.0, 100.0, 200.0, 200.0)
    # Integers too: (0,0),(1,2) sums to 3 -> (0, 0, 1000, 2000); against the full image the IoU is
    # 1e6 / (2e6 + 1e6 - 1e6) = 0.5: correct.
    score = released_case("<answer>(0,0),(1,2)</answer>", FULL_GT)
    assert (score.box, score.iou, score.correct) == ((0.0, 0.0, 1000.0, 2000.0), 0.5, True)


def test_negative_coordinates_go_through_pattern_4():
    # (-10,0),(100,100) vs (0,0),(100,100): areas 11000 and 10000, intersection 10000 -> 10/11.
    score = released_case("<answer>(-10,0),(100,100)</answer>", SQUARE_GT)
    assert score.pattern == 4 and score.iou == pytest.approx(10 / 11, rel=1e-6) and score.correct


def test_no_pattern_gives_zeros_and_pattern_0():
    score = released_case("<answer>the left one</answer>", SQUARE_GT)
    assert (score.box, score.pattern, score.iou, score.correct) == ((0.0, 0.0, 0.0, 0.0), 0, 0.0, False)


# ---------------------------------------------------------------------------------------------
# IoU


def test_float32_rounds_just_under_half_up_to_half():
    # Exactly 1000 * 499.99999 / 1e6 = 0.49999999 < 0.5, but that rounds to 0.5 in float32.
    response = "<answer>(0,0),(1000,499.99999)</answer>"
    assert Fraction(1000) * Fraction("499.99999") / 10**6 < Fraction(1, 2)
    score = released_case(response, FULL_GT)
    assert (score.iou, score.correct) == (0.5, True)
    assert not karl_case(response, FULL_GT).correct


def test_reversed_corners_and_zero_union():
    # Both corners swapped: positive area 10000, no intersection -> 0.
    assert released_case("<answer>(100,100),(0,0)</answer>", SQUARE_GT).iou == 0.0
    # Only y swapped: area -10000 cancels the ground truth's 10000 -> 0 / 0 = NaN, which never beats 0.
    raw = released.iou_float32((0, 100, 100, 0), (0, 0, 100, 100))[0]
    assert math.isnan(raw)
    assert released_case("<answer>(0,100),(100,0)</answer>", SQUARE_GT).iou == 0.0


def test_nan_and_inf_boxes_score_zero():
    assert released_case("<answer>(nan, 0), (100, 100)</answer>", SQUARE_GT).iou == 0.0
    assert released_case("<answer>(0, 0), (inf, inf)</answer>", SQUARE_GT).iou == 0.0  # inf area: 100 / inf


def test_running_max_keeps_zero_for_negative_and_nan():
    assert released.running_max([-0.5, math.nan, 0.0, 0.25]).tolist() == [0.0, 0.0, 0.0, 0.25]


def test_truncated_correct_can_drop_a_case():
    assert released.truncated_correct(22, 15) == 14
    assert released.truncated_correct(10, 7) == 7
    assert released.truncated_correct(0, 0) == 0


def test_prompt_text_keeps_the_image_text_and_two_spaces():
    assert released.prompt_text("<image>Find X") == (
        "<image>Find X  Output the thinking process in <think> </think> and final answer (bounding box) in "
        "<answer> </answer> tags.")
    assert released.prompt_text("Find X").startswith("<image>Find X  Output")


# ---------------------------------------------------------------------------------------------
# Property tests against the oracle, on adversarial responses.

_FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "\n", "(", ")", ",", ", ", "),(", "[", "]", "[[", "]]",
    "```json", "```", "```json\n", "So the answer is ", "the answer is ", " ", "x", "(the left one)",
    "(brown dog, small)", '{"bbox_2d": [', '], "label": "dog"}', "nan", "inf", "-", ".", "\t", "é",
]
_NUMBERS = st.one_of(
    st.integers(0, 1000).map(str),
    st.integers(-50, 1100).map(str),
    st.sampled_from(["0", "1", "0.5", "0.25", "0.1", "499.99999", "500.00001", "-0.1", "1e3", "007", "1.", ".5",
                     "9" * 60, "٣", "1_0", "nan", "inf", "-inf"]),
    st.floats(-10, 1010, allow_nan=False).map(lambda v: f"{v:.{abs(int(v * 7)) % 6}f}"),
)


@st.composite
def boxes_text(draw) -> str:
    a, b, c, d = (draw(_NUMBERS) for _ in range(4))
    form = draw(st.sampled_from([
        "({},{}),({},{})", "({}, {}),({},{})", "({}, {}), ({}, {})", "[{}, {}, {}, {}]", "({}, {}, {}, {})",
        "({}, {})\n({}, {})", "[[{},{},{},{}]]", '{{"bbox_2d": [{}, {}, {}, {}]}}', "({},x{}),({},{})",
        "[{},{},{},{}]", "So the answer is ({},{}),({},{})",
    ]))
    return form.format(a, b, c, d)


responses = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), boxes_text(), st.text(max_size=6)), max_size=14).map(
    "".join)


@st.composite
def wrapped_responses(draw) -> str:
    """Well-formed, multi-line, fenced and prose-laden wrappings of generated boxes."""
    inner = draw(boxes_text())
    other = draw(boxes_text())
    template = draw(st.sampled_from([
        "<think>{o}</think><answer>{i}</answer>",
        "<think>So the answer is {o}</think>\n<answer>\n{i}\n</answer>",
        "<answer>(the {o} one) {i}</answer>",
        "```json\n{o}\n```\n<answer>{i}</answer>",
        "<think>```json {o} ```</think><answer>\n```json\n{i}\n```</answer>",
        "{i}", "<answer>{i}</answer> trailing {o}", "<answer>{o}</answer><answer>{i}</answer>",
    ]))
    return template.format(i=inner, o=other)


ground_truths = st.tuples(*(st.integers(0, 1000) for _ in range(4))).map(
    lambda b: f"<|object_ref_start|>E<|object_ref_end|><|box_start|>({b[0]},{b[1]}),({b[2]},{b[3]})<|box_end|>")


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y


def _check_against_oracle(response: str, gt: str) -> None:
    ours = released_case(response, gt)
    value, correct, box, number = oracle.score(response, gt)
    assert ours.iou == value and ours.correct == correct and ours.pattern == number
    assert all(_same(float(a), float(b)) for a, b in zip(ours.box, box, strict=True))


@settings(max_examples=400, deadline=None)
@given(responses, ground_truths)
@example("<think>So the answer is (1,2),(3,4)</think>\n<answer>\n(0,0),(100,100)\n</answer>", SQUARE_GT)
@example("<answer>(0,0),(1000,499.99999)</answer>", FULL_GT)
@example("<answer>(0,100),(100,0)</answer>", SQUARE_GT)
@example("<answer>(a, b), (0, 0), (c, d)</answer>", SQUARE_GT)
def test_matches_the_oracle_on_adversarial_text(response, gt):
    _check_against_oracle(response, gt)


@settings(max_examples=400, deadline=None)
@given(wrapped_responses(), ground_truths)
def test_matches_the_oracle_on_wrapped_boxes(response, gt):
    _check_against_oracle(response, gt)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(*(st.one_of(st.integers(-2000, 2000), st.floats(allow_nan=True, allow_infinity=True,
                                                                           width=64)) for _ in range(4))),
                min_size=1, max_size=20),
       st.tuples(*(st.integers(0, 10**12) for _ in range(4))))
def test_float32_iou_matches_torch(preds, target):
    values = released.iou_float32(preds, [target] * len(preds))
    for pred, value in zip(preds, values.tolist(), strict=True):
        assert _same(value, oracle.iou(list(pred), list(target)))


@settings(max_examples=200, deadline=None)
@given(st.lists(responses, min_size=1, max_size=30), st.data())
def test_vectorised_scoring_equals_case_by_case(batch, data):
    targets = [released.ground_truth_box(data.draw(ground_truths)) for _ in batch]
    together = released.score_responses(batch, targets)
    one_by_one = [released.score_response(r, t) for r, t in zip(batch, targets, strict=True)]
    assert [repr(s) for s in together] == [repr(s) for s in one_by_one]  # repr: NaN coordinates compare equal


# ---------------------------------------------------------------------------------------------
# Aggregates and the knowledge split, case for case against the oracle.

_CATEGORIES = ("aircraft", "car", "reptilia", "bird", "food", "dog", "mollusca", "mammal", "flower", "landmark")
_SEEN = _CATEGORIES[:5]
_LEVEL_NAMES = oracle.HIGH + oracle.LOW


@st.composite
def benchmarks(draw):
    """Cases (category, entity, ground-truth answer, response) and the four knowledge tables."""
    from karl_verl.evaluation.bench import BenchCase

    size = draw(st.integers(1, 40))
    entities = [f"E{i}" for i in range(draw(st.integers(1, 8)))]
    rows = []
    for _ in range(size):
        category = draw(st.sampled_from(_CATEGORIES))
        entity = draw(st.sampled_from(entities))
        gt = draw(ground_truths).replace(">E<", f">{entity}<")
        response = draw(st.one_of(responses, wrapped_responses()))
        rows.append((category, entity, gt, response))
    train = frozenset(draw(st.lists(st.sampled_from(entities), unique=True)))
    tables = [{e: draw(st.sampled_from(_LEVEL_NAMES)) for e in entities} for _ in range(3)]
    cases = [BenchCase(question_id=f"q{i}", row=i + 1, question="Find", image=b"", width=1, height=1,
                       category=category, entity=released.ground_truth_entity(gt),
                       boxes=(released.ground_truth_box(gt),))
             for i, (category, _entity, gt, _response) in enumerate(rows)]
    return rows, cases, train, tables


@settings(max_examples=150, deadline=None)
@given(benchmarks())
def test_aggregates_and_knowledge_split_match_the_oracle(bench):
    from pathlib import Path

    from karl_verl.evaluation.bench import evaluate
    from karl_verl.evaluation.knowledge import KnowledgeTables

    rows, cases, train, tables = bench
    levels = [{e: _LEVEL_NAMES.index(name) + 1 for e, name in table.items()} for table in tables]
    knowledge = KnowledgeTables(train_entities=train, directory=Path("k"),
                                tables=dict(zip(("train", "trainood", "testood"), levels, strict=True)))
    responses = {case.question_id: row[3] for case, row in zip(cases, rows, strict=True)}
    metrics, results = evaluate(cases, responses, seen_categories=_SEEN, unseen_categories=_CATEGORIES[5:],
                                protocol="released", knowledge=knowledge)
    scored = [oracle.score(row[3], row[2]) for row in rows]
    expected = oracle.aggregate([(row[0], s[0], s[1]) for row, s in zip(rows, scored, strict=True)], _SEEN)
    groups = {**metrics.categories, "seen": metrics.seen, "unseen": metrics.unseen, "all": metrics.overall}
    for name, (num, acc, mean_iou) in expected.items():
        assert (groups[name].n, groups[name].acc, groups[name].mean_iou) == (num, acc, mean_iou)
    assert all(g.n == 0 for name, g in groups.items() if name not in expected)
    split = oracle.knowledge_split([(row[0], row[1], s[1]) for row, s in zip(rows, scored, strict=True)], _SEEN,
                                   train, *tables)
    for (domain, band), (right, num) in split.items():
        group = metrics.knowledge[band if domain == "all" else f"{domain} {band}"]
        assert (group.correct, group.n) == (right, num)


# ---------------------------------------------------------------------------------------------
# The examples of docs/EVALUATION.md's table of differences, scored under both protocols.

_TWO_BOXES = SQUARE_GT + "<|box_start|>(500,500),(600,600)<|box_end|>"


@pytest.mark.parametrize("response, gt, karl_hit, released_hit", [
    ("<answer>(500,500),(600,600)</answer>", _TWO_BOXES, True, False),
    ("<think>So the answer is (500,500),(600,600)?</think><answer>\n(0,0),(100,100)\n</answer>", SQUARE_GT, True,
     False),
    ('<think>```json {"bbox_2d": [500, 500, 600, 600]} ```</think>\n<answer>\n(0,0),(100,100)\n</answer>',
     SQUARE_GT, True, False),
    ("<answer>(brown dog, left) (0, 0), (100, 100)</answer>", SQUARE_GT, True, False),
    ("<answer>(0, 0),\n(100, 100)</answer>", SQUARE_GT, True, False),
    ("<answer>[0,0,100,100]</answer>", SQUARE_GT, True, False),
    ("<answer>(0,x0),(100,100)</answer>", SQUARE_GT, False, True),
    ("<answer>(0,0),(1,2)</answer>", FULL_GT, False, True),
    ("<answer>(0.0,0.0),(0.1,0.1)</answer>", SQUARE_GT, False, True),
    ("<answer>(0,0),(1000,499.99999)</answer>", FULL_GT, False, True),
    ("<answer>(0,100),(100,0)</answer>", SQUARE_GT, False, False),
    ("<answer>(0, 0, 100, 100)</answer>", SQUARE_GT, True, True),
])
def test_documented_differences(response, gt, karl_hit, released_hit):
    assert (karl_case(response, gt).correct, released_case(response, gt).correct) == (karl_hit, released_hit)
