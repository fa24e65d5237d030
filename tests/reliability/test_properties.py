"""Property-based tests of every parser that reads model text (issue 6.1).

On arbitrary text the box reader, the reward, the probe's answer parser and the evaluator's
prediction parser never raise and always return values in their documented ranges; on generated
well-formed responses the reward follows the documented formula (docs/METHOD.md section 3) exactly,
checked both against a direct formula in exact arithmetic and against the independent oracle
``tests/_support/released_reward.py``.

One odd model output must not end a multi-day run: these are the functions every rollout and every
probe reply goes through.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import pytest
import released_reward
from hypothesis import example, given
from hypothesis import strategies as st
from reliability_kit import profile, record, scaled

from karl_verl.accuracy import EVAL_BOX_FORMATS, ground_truth_boxes, prediction_box
from karl_verl.accuracy import score_response as eval_score
from karl_verl.boxes import ZERO_BOX, box_iou, find_box_reference, read_box, read_box_reference
from karl_verl.config import REWARD_PRESETS, RewardConfig
from karl_verl.data.schema import DataError
from karl_verl.evaluation.bench import load_predictions
from karl_verl.mastery import LEVEL_NAMES, MasteryError, MasteryTable
from karl_verl.probe.questions import LETTERS
from karl_verl.probe.scoring import parse_choice
from karl_verl.reward import compute_score, score_response

# ---------------------------------------------------------------------------------------------
# Text strategies. Uniform random unicode rarely forms a box, a tag or a letter answer, so most
# text is assembled from the fragments the parsers look for; plain ``st.text`` (surrogates
# included) covers the rest.

FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "(", ")", "[", "]", ",", ", ", "),(", ") (", "\n", " ", "\t",
    "-", ".", "0", "1", "5", "12", "999", "1000", "0.5", "-0.1", "007", "9" * 400, "٣", "１", "1e3", "NaN",
    "Infinity", "inf", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    '{"bbox_2d": [', "]}", '"label": "x"', "```json\n", "```", "{", "}", ":", '"', "x", "é", "🚀", "\u200b",
    "Answer:", "answer is", "option", "The", "A", "B", "C", "D", "a", "b", "(B)", "C.", "D)", "A ", "It is",
]
fragment_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.integers(-50, 1100).map(str), st.text(max_size=4)), max_size=40
).map("".join)
any_text = st.one_of(fragment_text, st.text(st.characters(exclude_categories=()), max_size=200))

LEVELS = st.integers(1, 5)


# ---------------------------------------------------------------------------------------------
# Box reader and IoU


class TestBoxReader:
    @profile()
    @given(any_text)
    @example("(" + "9" * 400 + ",1),(2,3)")  # float overflow -> inf, still a value
    @example("(-" + "9" * 400 + ",1),(" + "9" * 400 + ",3)")  # inf + -inf: the sum is NaN
    @example("(0.1,0.2),(0.3,0.4)")  # the x1000 rule
    def test_reference_reader_is_total_and_equals_the_released_reader(self, text):
        record("cases")
        box = read_box_reference(text)
        assert isinstance(box, tuple) and len(box) == 4
        assert all(isinstance(v, float) and not math.isnan(v) for v in box)
        assert list(box) == released_reward.extract_bbox(text)
        found = find_box_reference(text)
        assert found == box or (found is None and box == ZERO_BOX)

    @profile()
    @given(any_text, st.sampled_from(["qwen3_vl", "json"]))
    def test_opt_in_readers_return_none_or_four_finite_floats(self, text, box_format):
        record("cases")
        box = read_box(text, box_format)
        assert box is None or (len(box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in box))

    @profile()
    @given(any_text, st.integers(1, 20000), st.integers(1, 20000))
    def test_absolute_pixel_reader_with_any_image_size(self, text, width, height):
        record("cases")
        box = read_box(text, "qwen25_vl_abs", image_size=(width, height))
        assert box is None or (len(box) == 4 and all(math.isfinite(v) for v in box))

    @profile()
    @given(st.tuples(*[st.floats()] * 4), st.tuples(*[st.floats()] * 4))
    @example((0.0, 0.0, 10.0, 10.0), (0.0, 0.0, 10.0, 10.0))
    @example((10.0, 10.0, 0.0, 0.0), (0.0, 0.0, 10.0, 10.0))  # corners are not reordered
    @example((0.0, 0.0, 1e308, 1e308), (0.0, 0.0, 1e308, 1e308))  # areas overflow
    def test_iou_is_none_or_in_unit_interval_and_symmetric(self, a, b):
        record("cases")
        value = box_iou(a, b)
        assert value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)
        assert box_iou(b, a) == value

    @profile()
    @given(st.tuples(*[st.integers(-2000, 2000)] * 4))
    def test_iou_of_a_box_with_itself(self, box):
        record("cases")
        x1, y1, x2, y2 = box
        value = box_iou(box, box)
        if (x2 - x1) * (y2 - y1) > 0 and x2 > x1:
            assert value == 1.0
        else:
            assert value is None or value == 0.0


# ---------------------------------------------------------------------------------------------
# The reward on arbitrary text


def _check_breakdown(result: dict, low: float, high: float) -> None:
    assert low <= result["score"] <= high
    assert 0.0 <= result["iou"] <= 1.0
    assert result["acc"] in (0.0, 1.0) and result["acc"] == (1.0 if result["iou"] >= 0.5 else 0.0)
    assert result["format"] in (0.0, 0.5, 1.0)
    assert result["answered"] in (0.0, 1.0) and result["parsed"] in (0.0, 1.0)
    assert result["score"] == pytest.approx(result["ka_iou"] + result["format"], abs=1e-12)


ground_truths = st.one_of(
    fragment_text,
    st.builds(
        lambda entity, box: f"<|object_ref_start|>{entity}<|object_ref_end|><|box_start|>{box}<|box_end|>",
        st.sampled_from(["Sukhoi Su-30", "", " x "]),
        st.sampled_from(["(100,200),(300,400)", "(0,0),(1000,1000)", "(0.1,0.2),(0.3,0.4)", "(5,5),(5,5)",
                         "(10,10),(0,0)", "[1, 2, 3, 4]", "none"]),
    ),
)


class TestRewardOnArbitraryText:
    @profile()
    @given(any_text, ground_truths, LEVELS)
    def test_default_reward_is_in_range_and_equals_the_released_reward(self, response, ground_truth, level):
        record("cases")
        result = score_response(response, ground_truth, level, RewardConfig())
        _check_breakdown(result, -0.6, 2.0)
        assert result["score"] == pytest.approx(
            released_reward.reward(response, ground_truth, LEVEL_NAMES[level - 1]), abs=1e-12)

    @profile()
    @given(any_text, ground_truths, LEVELS, st.sampled_from(sorted(REWARD_PRESETS)),
           st.sampled_from(["reference", "qwen3_vl", "json", "qwen25_vl_abs"]), st.booleans())
    def test_every_preset_and_box_format_stays_in_its_range(self, response, ground_truth, level, preset, box_format,
                                                            inclusive):
        record("cases")
        pos, neg = REWARD_PRESETS[preset]
        extra = {"knowledge_level": level, "image_width": 640, "image_height": 480}
        result = compute_score("kvg", response, ground_truth, extra, preset=preset, box_format=box_format,
                               inclusive_threshold=inclusive)
        _check_breakdown(result, min(min(neg), 0.0), 1.0 + 1.0)
        assert result["knowledge_level"] == level

    @profile()
    @given(st.one_of(st.none(), st.integers(), st.binary(max_size=20), st.lists(st.text(max_size=5), max_size=3)))
    def test_non_text_response_scores_as_an_empty_one(self, response):
        record("cases")
        gt = "<|object_ref_start|>E<|object_ref_end|><|box_start|>(1,1),(9,9)<|box_end|>"
        result = compute_score("kvg", response, gt, {"knowledge_level": 2})
        assert result["score"] == 0.0 and result["answered"] == 0.0


# ---------------------------------------------------------------------------------------------
# The reward on generated well-formed responses with a known IoU

coordinate = st.integers(0, 1000)


@st.composite
def gt_boxes(draw) -> tuple[int, int, int, int]:
    x1, x2 = sorted(draw(st.lists(coordinate, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(coordinate, min_size=2, max_size=2, unique=True)))
    return x1, y1, x2, y2


@st.composite
def box_pairs(draw) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(ground truth, prediction): integer boxes, the target ordered with positive area.

    The prediction is near the target half the time, so both sides of tau = 0.65 are well
    covered, and anything at all (reversed, degenerate, off the grid) the rest.
    """
    gt = draw(gt_boxes())
    if draw(st.booleans()):
        return gt, tuple(draw(st.lists(coordinate, min_size=4, max_size=4)))  # type: ignore[return-value]
    spread = draw(st.integers(0, 60))
    return gt, tuple(v + draw(st.integers(-spread, spread)) for v in gt)  # type: ignore[return-value]


prose = st.text(st.characters(codec="utf-8", exclude_characters="<>()"), max_size=30)
gaps = st.sampled_from(["", " ", "\n", "\n\n  \t"])


def _released_scaling(box: tuple[int, ...]) -> tuple[Fraction, ...]:
    # The released reader: four values summing below 4 are taken as 0-1 and multiplied by 1000.
    return tuple(Fraction(v) * (1000 if sum(box) < 4 else 1) for v in box)


def expected_score(pred, gt, level, *, preset="karl", inclusive=False, tau=Fraction(65, 100), cap=1.0,
                   answered=True, entity=True, tags=True) -> tuple[float, float | None]:
    """Score of a response holding ``(x1,y1),(x2,y2)`` in its answer, by the documented rules.

    IoU in exact arithmetic: corners as written, intersection width and height clamped at 0, a
    union without positive area is a miss. Returns (score, IoU or None).
    """
    pos, neg = REWARD_PRESETS[preset]
    fmt = (0.5 if tags else 0.0) + (0.5 if answered else 0.0)
    if not answered or not entity:
        return fmt, None
    p, g = _released_scaling(pred), _released_scaling(gt)
    inter = max(Fraction(0), min(p[2], g[2]) - max(p[0], g[0])) * max(Fraction(0), min(p[3], g[3]) - max(p[1], g[1]))
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    if union <= 0:
        return neg[level - 1] + fmt, None
    iou = inter / union
    if iou >= tau if inclusive else iou > tau:
        return min(pos[level - 1] * float(iou), cap) + fmt, float(iou)
    return neg[level - 1] + fmt, float(iou)


class TestRewardFollowsTheRules:
    @profile()
    @given(box_pairs(), prose, prose, prose, gaps, st.sampled_from(["", " trailing", "\n(1,2),(3,4)"]))
    @example(((0, 0, 1, 1), (0, 0, 1, 1)), "", "", "", "", "")  # both boxes read as 0-1 (sum < 4): x1000
    @example(((0, 0, 1, 1), (0, 0, 1000, 1000)), "", "", "", "", "")
    @example(((100, 100, 300, 300), (100, 100, 230, 300)), "", "", "", "", "")  # IoU exactly 0.65: a miss
    def test_well_formed_response_at_every_level(self, boxes, think, before, after, gap, tail):
        record("cases")
        gt, pred = boxes
        response = f"<think>{think}</think>{gap}<answer>{before}({pred[0]},{pred[1]}),({pred[2]},{pred[3]}){after}" \
                   f"</answer>{tail}"
        ground_truth = f"<|object_ref_start|>Su-30<|object_ref_end|><|box_start|>({gt[0]},{gt[1]}),({gt[2]},{gt[3]})" \
                       "<|box_end|>"
        for level in range(1, 6):
            want, iou = expected_score(pred, gt, level)
            result = compute_score("kvg", response, ground_truth, {"knowledge_level": level})
            assert result["score"] == pytest.approx(want, abs=1e-12), (level, iou)
            assert result["score"] == pytest.approx(
                released_reward.reward(response, ground_truth, LEVEL_NAMES[level - 1]), abs=1e-12)
            assert result["iou"] == pytest.approx(0.0 if iou is None else iou, abs=1e-15)
            assert result["format"] == 1.0

    @profile()
    @given(box_pairs(), st.sampled_from(sorted(REWARD_PRESETS)), st.booleans(), LEVELS)
    @example(((100, 100, 300, 300), (100, 100, 230, 300)), "karl", True, 3)  # IoU 0.65 passes with >=
    def test_presets_and_the_inclusive_threshold(self, boxes, preset, inclusive, level):
        record("cases")
        gt, pred = boxes
        response = f"<think>t</think><answer>({pred[0]},{pred[1]}),({pred[2]},{pred[3]})</answer>"
        ground_truth = f"<|object_ref_start|>E<|object_ref_end|>({gt[0]},{gt[1]}),({gt[2]},{gt[3]})"
        want, _ = expected_score(pred, gt, level, preset=preset, inclusive=inclusive)
        result = compute_score("kvg", response, ground_truth, {"knowledge_level": level}, preset=preset,
                               inclusive_threshold=inclusive)
        assert result["score"] == pytest.approx(want, abs=1e-12)

    @profile()
    @given(box_pairs(), LEVELS, st.booleans(), st.booleans(), st.booleans())
    def test_missing_answer_entity_or_tags(self, boxes, level, answered, entity, tags):
        record("cases")
        gt, pred = boxes
        box = f"({pred[0]},{pred[1]}),({pred[2]},{pred[3]})"
        body = f"<answer>{box}</answer>" if answered else f"the box is {box}"
        response = f"<think>t</think>{body}" if tags else f"Sure. {body}"
        marker = "<|object_ref_start|>E<|object_ref_end|>" if entity else ""
        ground_truth = f"{marker}<|box_start|>({gt[0]},{gt[1]}),({gt[2]},{gt[3]})<|box_end|>"
        want, _ = expected_score(pred, gt, level, answered=answered, entity=entity, tags=tags and answered)
        result = compute_score("kvg", response, ground_truth, {"knowledge_level": level})
        assert result["score"] == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The probe's answer parser

options_lists = st.one_of(
    st.none(),
    st.lists(st.text(max_size=12), max_size=6),
    st.lists(st.one_of(st.text(max_size=8), st.none(), st.integers()), max_size=5),
    st.just(["Airbus A320", "Boeing 747", "Boeing 747-400", "Su-30"]),
)


class TestParseChoice:
    @profile()
    @given(any_text, options_lists)
    def test_returns_none_or_one_letter(self, text, options):
        record("cases")
        assert parse_choice(text, options) in (None, *LETTERS)

    @profile()
    @given(st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.text())))
    def test_non_text_is_unparseable(self, value):
        record("cases")
        assert parse_choice(value) is None

    @profile()
    @given(st.sampled_from(LETTERS),
           st.sampled_from(["", "(", "[", "**", "Answer: ", "The answer is ", "answer: (", "Option "]),
           st.sampled_from(["", ".", ")", "]", "**", " ", "\n", ". That is my choice"]),
           st.text(st.characters(codec="utf-8"), max_size=60).filter(lambda t: "</think>" not in t.lower()),
           st.booleans())
    def test_a_stated_letter_is_read_whatever_the_reasoning(self, letter, prefix, suffix, thinking, in_answer):
        record("cases")
        reply = f"{prefix}{letter}{suffix}"
        text = f"<think>{thinking}</think>" + (f"<answer>{reply}</answer>" if in_answer else reply)
        assert parse_choice(text) == letter


# ---------------------------------------------------------------------------------------------
# The evaluator's prediction parser (karl_verl.accuracy / evaluation.bench)

targets = st.lists(st.tuples(*[st.floats(0, 1000)] * 4), min_size=1, max_size=3)


class TestEvaluatorParser:
    @profile()
    @given(any_text, st.sampled_from(EVAL_BOX_FORMATS), st.integers(1, 10000), st.integers(1, 10000))
    def test_prediction_box_is_none_or_four_finite_floats(self, text, box_format, width, height):
        record("cases")
        box = prediction_box(text, box_format, (width, height))
        assert box is None or (len(box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in box))

    @profile()
    @given(st.one_of(st.none(), any_text), targets, st.sampled_from(EVAL_BOX_FORMATS))
    def test_case_score_is_in_range(self, response, boxes, box_format):
        record("cases")
        score = eval_score(response, boxes, box_format, (640, 480))
        assert 0.0 <= score.iou <= 1.0
        assert score.correct == (score.iou >= 0.5)
        assert score.parsed == (score.box is not None)
        if response is None:
            assert not score.parsed and score.iou == 0.0

    @profile()
    @given(any_text)
    def test_ground_truth_boxes(self, text):
        record("cases")
        boxes = ground_truth_boxes(text)
        assert all(len(box) == 4 and all(isinstance(v, float) for v in box) for box in boxes)

    @scaled(0.3)
    @given(st.lists(st.one_of(
        st.text(max_size=60),
        st.builds(lambda q, r: json.dumps({"question_id": q, "response": r}),
                  st.one_of(st.sampled_from(["q1", "q2", " q1 "]), st.integers(-3, 3), st.booleans(), st.none()),
                  st.one_of(any_text, st.none(), st.integers())),
        st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                 max_size=3),
                     max_leaves=8).map(json.dumps),
    ), max_size=6))
    def test_predictions_file_loads_or_is_refused_with_its_name(self, lines):
        record("cases")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "preds.jsonl"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            try:
                loaded = load_predictions(path, ["q1", "q2"])
            except DataError as err:
                assert "preds.jsonl" in str(err)
            else:
                assert set(loaded.responses) <= {"q1", "q2"}


# ---------------------------------------------------------------------------------------------
# Long adversarial replies: a parser that goes quadratic stalls a reward worker or the probe for
# seconds per reply (a model that loops on one token can write 100 KB of it).

LONG = 100_000
LONG_REPLIES = {
    "open parenthesis then digits": "(" + "1" * LONG,
    "unclosed pairs": "(1," * (LONG // 3),
    "number runs": "(1, 2" * (LONG // 5),
    "spaces": "(" + " " * LONG + "1",
    "open answer tags": "<think>x</think>" + "<answer>(1,2" * (LONG // 12),
    "closing think tags": "<think>" + "</think>" * (LONG // 8),
    "answer words": "the answer is " * (LONG // 14),
    "standalone letters": "A B " * (LONG // 4),
    "parenthesised letters": "(A" * (LONG // 2),
    "json openings": '{"bbox_2d": [' * (LONG // 13),
    "brackets": "[" * LONG,
    "code fences": "```" * (LONG // 3),
    "decimals": "1." * (LONG // 2),
    "pairs on lines": "(1, 2)\n" * (LONG // 7),
    "list openings": "[1, 2, 3, " * (LONG // 10),
}
GT = "<|object_ref_start|>E<|object_ref_end|><|box_start|>(1,1),(5,5)<|box_end|>"
PARSERS = {
    "read_box_reference": read_box_reference,
    "read_box qwen3_vl": lambda text: read_box(text, "qwen3_vl"),
    "reward": lambda text: compute_score("kvg", text, GT),
    "reward, inside an answer": lambda text: compute_score("kvg", f"<think>t</think><answer>{text}</answer>", GT),
    "parse_choice": lambda text: parse_choice(text, ["Airbus A320", "Boeing 747", "Su-30", "F-16"]),
    "prediction_box": prediction_box,
    "ground_truth_boxes": ground_truth_boxes,
}


@pytest.mark.parametrize("shape", list(LONG_REPLIES))
def test_parsers_stay_fast_on_long_adversarial_replies(shape):
    text = LONG_REPLIES[shape]
    for name, parse in PARSERS.items():
        start = time.perf_counter()
        parse(text)
        elapsed = time.perf_counter() - start
        # Linear readers take milliseconds here; one second is far from both that and a quadratic scan.
        assert elapsed < 1.0, f"{name} took {elapsed:.2f} s on 100 KB of {shape!r}"
    record("cases", len(PARSERS))


def test_parse_choice_is_linear_on_open_answer_tags():
    text = "<answer>" * 5_000  # 40 KB
    start = time.perf_counter()
    parse_choice(text)
    assert time.perf_counter() - start < 0.25


# ---------------------------------------------------------------------------------------------
# The mastery table (read from files the trainer and the evaluator are given)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(LEVEL_NAMES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.one_of(st.text(max_size=10), st.sampled_from(["level", "knowledge_category", "score", "num_questions",
                                                          "epoch", "format", "entities", "meta"])),
        inner, max_size=5),
    max_leaves=20,
)


class TestMasteryTable:
    @profile()
    @given(json_values)
    @example({"x": {"level": 10**400}})  # an integer too large for a float
    @example({"x": {"level": 2, "score": 10**400}})
    @example({"format": "karl-verl/mastery-v1", "entities": {"x": {"level": 1}}, "meta": []})
    def test_any_json_gives_a_table_or_a_mastery_error(self, data):
        record("cases")
        try:
            table = MasteryTable.from_json(data, source="t.json")
        except MasteryError as err:
            assert "t.json" in str(err)
        else:
            assert all(1 <= entry.level <= 5 for entry in table.entries.values())

    @scaled(0.3)
    @given(st.dictionaries(st.text(min_size=1, max_size=20), st.floats(0, 1), max_size=30), st.integers(0, 50))
    def test_save_load_round_trip(self, scores, epoch):
        record("cases")
        table = MasteryTable.from_scores(scores, epoch=epoch, meta={"run": "x"})
        with tempfile.TemporaryDirectory() as folder:
            loaded = MasteryTable.load(table.save(Path(folder) / "m.json"))
        assert loaded == table
        for entity in scores:
            assert loaded.level_of(entity) == table.level_of(entity) is not None
