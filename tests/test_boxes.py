"""Box reading and IoU (karl_verl/boxes.py)."""

import random
import re

import pytest
import released_reward
from corpus import random_response

from karl_verl import boxes
from karl_verl.boxes import box_iou, find_box_reference, read_box, read_box_reference, smart_resize


class TestReferenceReader:
    # (text, expected box) — each row pins one rule of the released box reader (docs/METHOD.md section 3).
    CASES = [
        ("(12,40),(300,520)", (12.0, 40.0, 300.0, 520.0)),  # form 1
        ("(12, 40),(300,520)", (12.0, 40.0, 300.0, 520.0)),  # spaces allowed inside the first pair
        ("(12,40), (300,520)", (0.0, 0.0, 0.0, 0.0)),  # ...but not between the pairs
        ("(1,2),(3,4) then (10,20),(30,40)", (10.0, 20.0, 30.0, 40.0)),  # last match of the form
        ("[10, 20, 30, 40] and (1,2),(300,400)", (1.0, 2.0, 300.0, 400.0)),  # form 1 wins over form 2
        ("[10, 20, 30, 40]", (10.0, 20.0, 30.0, 40.0)),  # form 2
        ("[10,20,30,40]", (0.0, 0.0, 0.0, 0.0)),  # form 2 needs ", "
        ("(10, 20, 30, 40)", (10.0, 20.0, 30.0, 40.0)),  # form 3
        ("[1, 2, 3, 4] (10, 20, 30, 40)", (1.0, 2.0, 3.0, 4.0)),  # form 2 before form 3
        ("(10, 20) to (30, 40)", (10.0, 20.0, 30.0, 40.0)),  # form 4
        ("(10, 20)\n(30, 40)", (10.0, 20.0, 30.0, 40.0)),  # form 4 across one newline
        ("(10, 20)\n\n(30, 40)", (0.0, 0.0, 0.0, 0.0)),  # ...not two
        ("(0.1,0.2),(0.3,0.4)", (100.0, 200.0, 300.0, 400.0)),  # sum < 4: relative, x1000
        ("(1,1),(1,0.5)", (1000.0, 1000.0, 1000.0, 500.0)),  # sum 3.5 < 4
        ("(1,1),(1,1)", (1.0, 1.0, 1.0, 1.0)),  # sum 4 is not < 4
        ("(-5,10),(20,30)", (-5.0, 10.0, 20.0, 30.0)),  # negative numbers
        ("(1,x23),(4,5)", (1.0, 23.0, 4.0, 5.0)),  # any characters before y1
        ("(1,\n23),(4,5)", (0.0, 0.0, 0.0, 0.0)),  # ...but on the same line
        ("no box", (0.0, 0.0, 0.0, 0.0)),
        ("", (0.0, 0.0, 0.0, 0.0)),
    ]

    @pytest.mark.parametrize(("text", "expected"), CASES)
    def test_rules(self, text, expected):
        assert read_box_reference(text) == expected

    def test_none_when_no_form_matches(self):
        assert find_box_reference("nothing") is None
        assert read_box("nothing", "reference") is None

    def test_form1_scanner_equals_regex_findall_on_random_text(self):
        rng = random.Random(1234)
        alphabet = list("(),.-0123456789 \nab[]") + ["),(", "(1,", "1.5", "-2", "٣"]
        for _ in range(30000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            assert boxes._form1_findall(text) == boxes.FORM1_PATTERN.findall(text), repr(text)

    def test_matches_oracle_on_adversarial_responses(self):
        rng = random.Random(7)
        for _ in range(5000):
            text = random_response(rng)
            expected = released_reward.extract_bbox(text)
            got = read_box_reference(text)
            assert [float(v) for v in expected] == pytest.approx(list(got), nan_ok=True), repr(text)

    def test_long_line_is_linear(self):
        # The form-1 regex backtracks quadratically on this line (minutes at this length); the
        # scanner reads it in one pass. Same answer as the regex on a short version.
        short = "(1," * 50 + "5),(2,3)"
        assert boxes._form1_findall(short) == boxes.FORM1_PATTERN.findall(short) == [("1", "5", "2", "3")]
        assert read_box_reference("(1," * 40000 + "5),(2,3)") == (1.0, 5.0, 2.0, 3.0)


class TestIoU:
    def test_values(self):
        assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
        assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
        assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0

    def test_zero_union_is_none(self):
        assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) is None

    def test_corners_not_reordered(self):
        # An inverted box has negative area as written; the intersection clamps at 0.
        assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0

    def test_non_finite_is_none(self):
        assert box_iou((0, 0, float("inf"), 10), (0, 0, 10, 10)) is None


class TestModernReaders:
    def test_qwen3_json_in_fence(self):
        text = 'Here:\n```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "Su-30"}]\n```'
        assert read_box(text, "qwen3_vl") == (100.0, 200.0, 300.0, 400.0)
        assert read_box(text, "json") == (100.0, 200.0, 300.0, 400.0)

    def test_qwen3_plain_list_and_pairs(self):
        assert read_box("[1,2,3,4]", "qwen3_vl") == (1.0, 2.0, 3.0, 4.0)  # no x1000 rule
        assert read_box("(10, 20), (30, 40)", "qwen3_vl") == (10.0, 20.0, 30.0, 40.0)
        assert read_box("nothing", "qwen3_vl") is None
        assert read_box("[1,2,3,4]", "json") is None

    def test_qwen25_absolute_pixels(self):
        # An image already on the 28-pixel grid is not resized: pixels map straight to 0-1000.
        assert smart_resize(560, 280) == (560, 280)
        box = read_box("[28, 56, 140, 280]", "qwen25_vl_abs", image_size=(280, 560))
        assert box == pytest.approx((100.0, 100.0, 500.0, 500.0))
        box = read_box("[28, 56, 140, 280]", "qwen25_vl_abs", resized_size=(280, 560))
        assert box == pytest.approx((100.0, 100.0, 500.0, 500.0))

    def test_qwen25_resize_follows_the_processor_pixel_range(self):
        # 2800 x 1400 = 3.92M pixels: inside Qwen2.5-VL's default range (no downscale), but a processor
        # run with max_pixels = 28*28*1280 (1M) shrinks it to 1400 x 700 first.
        assert smart_resize(1400, 2800) == (1400, 2800)
        assert smart_resize(1400, 2800, max_pixels=28 * 28 * 1280) == (700, 1400)
        assert read_box("[0, 0, 1400, 700]", "qwen25_vl_abs", image_size=(2800, 1400)) == pytest.approx(
            (0.0, 0.0, 500.0, 500.0))
        small = read_box("[0, 0, 700, 350]", "qwen25_vl_abs", image_size=(2800, 1400),
                         pixels=(56 * 56, 28 * 28 * 1280))
        assert small == pytest.approx((0.0, 0.0, 500.0, 500.0))

    def test_qwen25_needs_a_size(self):
        with pytest.raises(ValueError, match="image_size"):
            read_box("[1, 2, 3, 4]", "qwen25_vl_abs")

    def test_unknown_format(self):
        with pytest.raises(ValueError, match="box_format"):
            read_box("x", "yolo")


def test_form_patterns_are_the_documented_ones():
    assert boxes.FORM1_PATTERN.pattern == released_reward.FORMS[0]
    assert re.compile(released_reward.FORMS[3]).pattern == boxes._FORM4.pattern
