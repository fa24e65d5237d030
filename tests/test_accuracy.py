"""Scoring one response: the predicted box in every format, the best IoU over the ground truth, Acc@0.5."""

from __future__ import annotations

import pytest

from karl_verl.accuracy import best_iou, ground_truth_boxes, prediction_box, score_response


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
