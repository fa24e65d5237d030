"""Acc@0.5 of one grounding response: the predicted box, its best IoU over the ground truth, correct or not.

How ``karl-verl eval`` scores a case, and ``data filter`` and ``data cot`` a sampled response
(KARL_METHOD.md section 6):

* the box is read from the first ``<answer>...</answer>`` span when there is one, else from the
  whole response, with :func:`karl_verl.boxes.read_box` in the chosen format (default
  ``qwen3_vl``: 0-1000 coordinates);
* no box read = unparseable = IoU 0, a miss;
* several ground-truth boxes: the best IoU over them;
* no response = IoU 0, a miss;
* correct when IoU >= 0.5 (inclusive).

Not the RL reward (that is :mod:`karl_verl.reward`). Pure module: no torch, no verl.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from karl_verl.boxes import NUM, QWEN25_PIXELS, Box, answer_span, box_iou, read_box

#: Acc@0.5: a prediction is correct when its IoU is at least this (inclusive).
ACC_THRESHOLD = 0.5
#: Box formats the evaluator reads; ``qwen3_vl`` is the default.
EVAL_BOX_FORMATS: tuple[str, ...] = ("qwen3_vl", "qwen25_vl_abs", "json", "reference")

# A ground-truth box in ``(x1,y1),(x2,y2)`` form, spaces tolerated; every occurrence is a box.
_GT_PAIR = re.compile(rf"\(\s*({NUM})\s*,\s*({NUM})\s*\)\s*,\s*\(\s*({NUM})\s*,\s*({NUM})\s*\)")


def ground_truth_boxes(text: str) -> list[Box]:
    """Every ``(x1,y1),(x2,y2)`` box in a ground-truth string, in order (0-1000 grid).

    >>> ground_truth_boxes("<|object_ref_start|>A<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    ...                    "<|box_start|>(5,6),(7,8)<|box_end|>")
    [(1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)]
    """
    return [tuple(float(v) for v in match) for match in _GT_PAIR.findall(text)]  # type: ignore[misc]


def add_box_arguments(parser: Any) -> None:
    """``--box-format`` and ``--abs-pixels`` for the commands that read predicted boxes."""
    parser.add_argument("--box-format", choices=EVAL_BOX_FORMATS, default="qwen3_vl",
                        help="qwen3_vl: 0-1000 (default); qwen25_vl_abs: absolute pixels of Qwen2.5-VL's resized "
                             "input; json: bbox_2d only; reference: the released reward's reader")
    parser.add_argument("--abs-pixels", type=_pixel_pair, default=QWEN25_PIXELS, metavar="MIN,MAX",
                        help="qwen25_vl_abs: min_pixels,max_pixels of the processor the model ran with "
                             f"(default: {QWEN25_PIXELS[0]},{QWEN25_PIXELS[1]}, Qwen2.5-VL's own)")


def _pixel_pair(text: str) -> tuple[int, int]:
    import argparse

    from karl_verl.config import ConfigError, pixel_bounds

    try:
        return pixel_bounds(text.split(","), "--abs-pixels")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def prediction_box(
    response: str, box_format: str = "qwen3_vl", image_size: tuple[int, int] | None = None,
    abs_pixels: tuple[int, int] = QWEN25_PIXELS,
) -> Box | None:
    """The predicted box on the 0-1000 grid, or None when the response holds none.

    ``image_size`` (width, height) of the original image is needed by ``qwen25_vl_abs``, with
    ``abs_pixels`` (min_pixels, max_pixels) of the processor the model ran with.
    """
    if box_format not in EVAL_BOX_FORMATS:
        raise ValueError(f"box format: expected one of {EVAL_BOX_FORMATS}, got {box_format!r}")
    answer = answer_span(response)
    text = response if answer is None else answer
    box = read_box(text, box_format, image_size=image_size, pixels=abs_pixels)  # type: ignore[arg-type]
    if box is not None and not all(math.isfinite(v) for v in box):
        return None
    return box


def best_iou(pred: Box | None, targets: Sequence[Box]) -> float:
    """Best IoU of ``pred`` over ``targets``; 0 when there is no prediction or no valid overlap.

    >>> best_iou((0, 0, 100, 100), [(500, 500, 600, 600), (0, 0, 100, 50)])
    0.5
    """
    if pred is None:
        return 0.0
    return max((iou for iou in (box_iou(pred, target) for target in targets) if iou is not None), default=0.0)


@dataclass(frozen=True)
class Score:
    """One response against its ground truth."""

    iou: float
    correct: bool
    parsed: bool
    box: Box | None


def score_response(
    response: str | None,
    targets: Sequence[Box],
    box_format: str = "qwen3_vl",
    image_size: tuple[int, int] | None = None,
    threshold: float = ACC_THRESHOLD,
    abs_pixels: tuple[int, int] = QWEN25_PIXELS,
) -> Score:
    """IoU and correctness of one response; ``None`` (no prediction) scores as an unparsed miss."""
    box = None if response is None else prediction_box(response, box_format, image_size, abs_pixels)
    iou = best_iou(box, targets)
    return Score(iou=iou, correct=iou >= threshold, parsed=box is not None, box=box)
