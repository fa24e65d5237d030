"""Coordinate systems, box validation and the 0-1000 grid."""

from __future__ import annotations

import math

import pytest

from karl_verl.data.schema import (
    EDGE_TOLERANCE_PX,
    DataError,
    Location,
    check_grid_box,
    parse_boxes,
    probe_image,
    rl_row,
    to_grid,
    to_pixels,
)

WHERE = Location("annotations.jsonl", 17)


@pytest.mark.parametrize(("coords", "box"), [
    ("pixel_xyxy", (20, 10, 60, 30)),
    ("pixel_xywh", (20, 10, 40, 20)),
    ("unit_xyxy", (0.2, 0.2, 0.6, 0.6)),
    ("grid1000_xyxy", (200, 200, 600, 600)),
])
def test_every_coordinate_system_gives_the_same_pixels(coords, box):
    assert to_pixels(box, coords, 100, 50, WHERE) == pytest.approx((20, 10, 60, 30))


def test_grid_rounds_to_nearest_integer():
    # 1/3 of 300 px -> 333.33 -> 333; 2/3 -> 666.67 -> 667
    assert to_grid((100, 0, 200, 300), 300, 300) == (333, 0, 667, 1000)
    assert to_grid((0.5, 0, 1.5, 1), 1000, 1000) == (1, 0, 2, 1)  # halves round up


def test_small_overhang_is_clipped_larger_is_an_error():
    overhang = (-EDGE_TOLERANCE_PX, 0, 100 + EDGE_TOLERANCE_PX, 50)
    assert to_pixels(overhang, "pixel_xyxy", 100, 50, WHERE) == (0, 0, 100, 50)
    with pytest.raises(DataError, match=r"annotations.jsonl row 17, field 'boxes': .*outside the 100x50 image"):
        to_pixels((0, 0, 103, 50), "pixel_xyxy", 100, 50, WHERE)


@pytest.mark.parametrize(("box", "message"), [
    ((10, 10, 5, 20), "no area"),
    ((10, 10, 10, 20), "no area"),
    ((0, 0, math.nan, 20), "not finite"),
])
def test_degenerate_boxes_are_errors(box, message):
    with pytest.raises(DataError, match=message):
        to_pixels(box, "pixel_xyxy", 100, 50, WHERE)


@pytest.mark.parametrize(("value", "expected"), [
    ([1, 2, 3, 4], [(1, 2, 3, 4)]),
    ([[1, 2, 3, 4], [5, 6, 7, 8]], [(1, 2, 3, 4), (5, 6, 7, 8)]),
    ("1, 2, 3, 4", [(1, 2, 3, 4)]),
    ("1 2 3 4; 5 6 7 8", [(1, 2, 3, 4), (5, 6, 7, 8)]),
    ("[[1, 2, 3, 4]]", [(1, 2, 3, 4)]),
])
def test_parse_boxes_forms(value, expected):
    assert parse_boxes(value, WHERE) == expected


@pytest.mark.parametrize(("value", "message"), [
    ([1, 2, 3], r"expected 4 numbers, got \[1, 2, 3\]"),
    ([1, 2, "x", 4], "expected 4 numbers"),
    ([1, 2, float("nan"), 4], "finite"),
    ("", "empty"),
    ("1, 2, three, 4", "expected numbers"),
    ([], "expected a box"),
    (7, "expected a box"),
])
def test_parse_boxes_errors_name_file_row_and_field(value, message):
    with pytest.raises(DataError, match=message) as info:
        parse_boxes(value, WHERE)
    assert str(info.value).startswith("annotations.jsonl row 17, field 'boxes': ")
    assert (info.value.source, info.value.row, info.value.field) == ("annotations.jsonl", 17, "boxes")


def test_box_collapsing_on_the_grid_is_an_error():
    with pytest.raises(DataError, match="zero area on the 0-1000 grid"):
        check_grid_box(to_grid((10, 10, 10.2, 20), 10000, 100), WHERE)


def test_corrupt_and_truncated_images_are_errors(make_image):
    good = make_image((20, 10), (1, 1, 5, 5), (255, 0, 0), "JPEG")
    assert probe_image(good, None, WHERE) == (20, 10)
    with pytest.raises(DataError, match="field 'image': cannot decode image bytes"):
        probe_image(b"not an image", None, WHERE)
    with pytest.raises(DataError, match="cannot decode"):
        probe_image(good[: len(good) // 2], None, WHERE)


def test_rl_row_holds_first_box_in_ground_truth_and_all_in_extra_info():
    row = rl_row(image_bytes=b"x", width=10, height=20, entity="E", category="car",
                 boxes=[(1, 2, 3, 4), (5, 6, 7, 8)], split="train", index=3)
    assert row["reward_model"] == {"style": "rule", "ground_truth":
                                   "<|object_ref_start|>E<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"}
    assert row["extra_info"]["boxes"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert row["prompt"][0]["content"].count("<image>") == len(row["images"]) == 1


def test_data_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(DataError("a.csv", 3, "boxes", "bad")))
    assert (str(error), error.row, error.field) == ("a.csv row 3, field 'boxes': bad", 3, "boxes")
