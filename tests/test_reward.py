"""The KA-IoU + format reward (karl_verl/reward.py)."""

import pickle
import random

import pytest
import released_reward
from corpus import matching_pair, random_ground_truth, random_response

from karl_verl.config import ConfigError, RewardConfig
from karl_verl.mastery import LEVEL_NAMES, MasteryEntry, MasteryTable
from karl_verl.reward import KarlReward, compute_score, format_reward, ka_iou_reward

GT = "<|object_ref_start|>Sukhoi Su-30<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"


def answer(box: str, think: str = "<think>x</think>") -> str:
    return f"{think}<answer>{box}</answer>"


class TestFormula:
    # (response, level, expected score) with the default (paper) settings.
    CASES = [
        (answer("(100,100),(300,300)"), 1, 1.0 * 0.65 + 1.0),  # IoU 1 at level 1: s+ 0.65
        (answer("(100,100),(300,300)"), 5, 1.0 + 1.0),  # s+ 1.4 * 1.0 capped at 1.0
        (answer("(100,100),(300,280)"), 4, min(1.2 * 0.9, 1.0) + 1.0),  # IoU 0.9, capped
        (answer("(100,100),(300,280)"), 3, 0.9 + 1.0),
        (answer("(100,100),(230,300)"), 2, -0.5 + 1.0),  # IoU 0.65 is not > 0.65: s-
        (answer("(500,500),(600,600)"), 1, -0.6 + 1.0),  # a miss at level 1
        (answer("(500,500),(600,600)"), 5, 0.0 + 1.0),  # a miss at level 5 costs nothing
        (answer("[100, 100, 300, 300]"), 3, 1.0 + 0.5),  # no (x1,y1),(x2,y2): half the format reward
        ("<answer>(100,100),(300,300)</answer>", 3, 1.0 + 0.5),  # no <think>: half the format reward
        ("<think>x</think> no answer tag (100,100),(300,300)", 1, 0.0),  # no answer span: R_KA-IoU = 0
        (answer("nothing"), 1, -0.6 + 0.5),  # answered without a box: (0,0,0,0), a miss
        (" " + answer("(100,100),(300,300)"), 3, 1.0 + 0.5),  # format check anchored at char 0
        (answer("(100,100),(300,300)") + " trailing", 3, 2.0),  # trailing text allowed
    ]

    @pytest.mark.parametrize(("response", "level", "expected"), CASES)
    def test_cases(self, response, level, expected):
        result = compute_score("kvg", response, GT, {"knowledge_level": level})
        assert result["score"] == pytest.approx(expected, abs=1e-9)

    def test_ground_truth_without_entity_scores_format_only(self):
        gt = "<|box_start|>(100,100),(300,300)<|box_end|>"
        assert compute_score("kvg", answer("(100,100),(300,300)"), gt)["score"] == 1.0

    def test_zero_area_union_is_a_miss(self):
        gt = "<|object_ref_start|>E<|object_ref_end|><|box_start|>(5,5),(5,5)<|box_end|>"
        result = compute_score("kvg", answer("(5,5),(5,5)"), gt, {"knowledge_level": 1})
        assert result["score"] == pytest.approx(-0.6 + 1.0)
        assert result["iou"] == 0.0

    def test_inclusive_threshold(self):
        config = RewardConfig(inclusive_threshold=True)
        assert ka_iou_reward(0.65, 3, config) == pytest.approx(0.65)
        assert ka_iou_reward(0.65, 3, RewardConfig()) == -0.4

    def test_breakdown_fields(self):
        result = compute_score("kvg", answer("(100,100),(300,280)"), GT, {"knowledge_level": "partially correct"})
        assert result["iou"] == pytest.approx(0.9)
        assert result["acc"] == 1.0
        assert result["format"] == 1.0
        assert result["knowledge_level"] == 3
        assert result["ka_iou"] == pytest.approx(0.9)
        assert result["parsed"] == 1.0 and result["answered"] == 1.0

    def test_acc_is_inclusive_at_half(self):
        # IoU exactly 0.5: (100,100)-(300,300) vs (100,100)-(300,200).
        result = compute_score("kvg", answer("(100,100),(300,200)"), GT)
        assert result["iou"] == 0.5 and result["acc"] == 1.0


class TestMatchesReleasedReward:
    @pytest.mark.parametrize("level", LEVEL_NAMES)
    def test_adversarial_corpus(self, level):
        rng = random.Random(LEVEL_NAMES.index(level))  # hash() of a str changes per process
        for _ in range(3000):
            if rng.random() < 0.3:
                response, gt = matching_pair(rng)
            else:
                response, gt = random_response(rng), random_ground_truth(rng)
            expected = released_reward.reward(response, gt, level)
            got = compute_score("kvg", response, gt, {"knowledge_level": level})["score"]
            assert got == pytest.approx(expected, abs=1e-6), (response, gt)

    def test_missing_entity_defaults_to_completely_incorrect(self):
        response, gt = answer("(100,100),(300,280)"), GT
        assert compute_score("kvg", response, gt)["score"] == pytest.approx(
            released_reward.reward(response, gt, "completely incorrect")
        )


class TestNeverRaises:
    def test_hostile_strings_stay_in_range(self):
        hostile = [
            "", "<answer>", "</answer><answer>", "<think><think></answer>", "\x00" * 10, "🚀" * 1000,
            "<answer>(" + "9" * 400 + ",1),(2,3)</answer>", "<answer>[nan, inf, -inf, 1e999]</answer>",
            "<answer>(1,2),(3," + "4" * 5000 + ")</answer>", "<think>" * 5000, "(" * 100000,
            "<answer>" + "(1, 2)" * 20000 + "</answer>", "<answer>(-1e3,-2),(-3,-4)</answer>",
        ]
        for text in hostile:
            for level in range(1, 6):
                score = compute_score("kvg", text, GT, {"knowledge_level": level})["score"]
                assert -0.6 <= score <= 2.0

    def test_non_string_inputs(self):
        assert compute_score("kvg", None, None)["score"] == 0.0  # type: ignore[arg-type]


class TestLevelSource:
    def test_extra_info_wins_over_table(self, tmp_path):
        table = MasteryTable({"Sukhoi Su-30": MasteryEntry(level=1)})
        scorer = KarlReward(RewardConfig(), table=table)
        assert scorer("kvg", answer("(0,0),(1,1)"), GT, {"knowledge_level": 5})["knowledge_level"] == 5
        assert scorer("kvg", answer("(0,0),(1,1)"), GT, {})["knowledge_level"] == 1
        assert scorer("kvg", answer("(0,0),(1,1)"), GT, {})["level_from_table"] == 1.0

    def test_entity_from_extra_info_then_marker(self):
        table = MasteryTable({"Su-30": MasteryEntry(level=2), "Sukhoi Su-30": MasteryEntry(level=4)})
        scorer = KarlReward(RewardConfig(), table=table)
        assert scorer("kvg", "x", GT, {"entity": "Su-30"})["knowledge_level"] == 2
        assert scorer("kvg", "x", GT, {})["knowledge_level"] == 4

    def test_unknown_entity_takes_configured_default(self):
        scorer = KarlReward(RewardConfig(default_level="partially correct"), table=MasteryTable())
        result = scorer("kvg", "x", GT, {})
        assert result["knowledge_level"] == 3 and result["level_defaulted"] == 1.0

    def test_mastery_path_keyword(self, tmp_path):
        path = tmp_path / "mastery.json"
        path.write_text('{"Sukhoi Su-30": {"knowledge_category": "mostly correct"}}')
        assert compute_score("kvg", "x", GT, {}, mastery_path=str(path))["knowledge_level"] == 2
        # The table is re-read when the file changes on disk.
        MasteryTable({"Sukhoi Su-30": MasteryEntry(level=3)}).save(path)
        assert compute_score("kvg", "x", GT, {}, mastery_path=str(path))["knowledge_level"] == 3

    def test_bad_level_in_extra_info_names_it(self):
        with pytest.raises(ValueError, match="knowledge_level"):
            compute_score("kvg", "x", GT, {"knowledge_level": "expert"})


class TestContract:
    def test_extra_keywords_are_ignored(self):
        result = compute_score("kvg", answer("(100,100),(300,300)"), GT, None, reward_router_address=None, foo=1)
        assert result["score"] == 2.0

    def test_preset_keyword(self):
        result = compute_score("kvg", answer("(500,500),(600,600)"), GT, {"knowledge_level": 1}, preset="v1")
        assert result["score"] == pytest.approx(-0.8 + 1.0)

    def test_scorer_pickles(self):
        scorer = KarlReward(RewardConfig(preset="v2"), table=MasteryTable({"E": MasteryEntry(level=2)}))
        clone = pickle.loads(pickle.dumps(scorer))
        assert clone("kvg", answer("(1,1),(2,2)"), GT, {}) == scorer("kvg", answer("(1,1),(2,2)"), GT, {})

    def test_qwen25_reader_uses_image_size(self):
        config = RewardConfig(box_format="qwen25_vl_abs")
        scorer = KarlReward(config)
        # 280x560 image: pixels (28,56)-(84,168) are (100,100)-(300,300) on the 0-1000 grid.
        result = scorer("kvg", answer("[28, 56, 84, 168]"), GT, {"image_width": 280, "image_height": 560})
        assert result["iou"] == pytest.approx(1.0)
        with pytest.raises(ValueError, match="image_width"):
            scorer("kvg", answer("[28, 56, 84, 168]"), GT, {})

    def test_qwen25_reader_uses_the_configured_pixel_range(self):
        # 2800x1400 image that a processor capped at 1M pixels saw as 1400x700.
        config = RewardConfig(box_format="qwen25_vl_abs", abs_pixels=[3136, 28 * 28 * 1280])
        gt = "<|object_ref_start|>E<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>"
        result = KarlReward(config)("kvg", answer("[0, 0, 700, 350]"), gt, {"image_width": 2800, "image_height": 1400})
        assert result["iou"] == pytest.approx(1.0)
        with pytest.raises(ConfigError, match="karl.reward.abs_pixels"):
            RewardConfig(abs_pixels=(10, 5))


def test_format_reward_weights_are_configurable():
    config = RewardConfig(format_tags_weight=0.2, format_box_weight=0.0)
    assert format_reward(answer("(1,1),(2,2)"), config) == 0.2


def test_linear_format_check_equals_the_released_regex():
    from karl_verl.boxes import ANSWER_PATTERN, answer_span
    from karl_verl.reward import FORMAT_PATTERN, has_tag_structure

    rng = random.Random(3)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x", "\u2003", "<", "think>", "answer>"]
    for _ in range(30000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert has_tag_structure(text) == bool(FORMAT_PATTERN.match(text)), repr(text)
        match = ANSWER_PATTERN.search(text)
        assert answer_span(text) == (match.group(1) if match else None), repr(text)
