"""Reading boxes from model text, and IoU.

Pure module: no Ray, no verl, no torch.

Two readers:

* :func:`read_box_reference` reproduces the released KARL reward's box reading exactly
  (docs/METHOD.md section 3): four forms tried in order, first form that matches anywhere wins,
  last match of that form, x1000 when the four values sum below 4, (0, 0, 0, 0) when nothing
  matches. Form 1 (``(x1,y1),(x2,y2)`` with a lazy ``.*?`` inside) is computed by a linear-time
  scanner instead of the regex, because the regex backtracks quadratically on long lines; the
  scanner returns what ``re.findall`` would (tests compare them on random text).
* :func:`read_box` with a :data:`BoxFormat` other than ``"reference"`` reads what current models
  write: JSON ``bbox_2d`` (also inside a json code fence), ``[x1, y1, x2, y2]`` lists with any
  spacing and ``(x1,y1),(x2,y2)`` pairs, on Qwen3-VL's 0-1000 grid or in Qwen2.5-VL absolute
  pixels of the resized input, and returns ``None`` when there is no box.

Boxes are tuples ``(x1, y1, x2, y2)`` of floats on the 0-1000 grid.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from typing import Literal

Box = tuple[float, float, float, float]

#: An optionally negative integer or decimal, as the released reader defines a number.
NUM = r"-?\d+(?:\.\d+)?"

# Form 1 as the released code writes it; kept for documentation and for the equivalence tests.
FORM1_PATTERN = re.compile(rf"\(({NUM}),.*?({NUM})\),\(({NUM}),({NUM})\)")
_FORM2 = re.compile(rf"\[({NUM}), ({NUM}), ({NUM}), ({NUM})\]")
_FORM3 = re.compile(rf"\(({NUM}), ({NUM}), ({NUM}), ({NUM})\)")
_FORM4 = re.compile(rf"\(({NUM}), ({NUM})\)\n?.*?\(({NUM}), ({NUM})\)")

_FORM1_HEAD = re.compile(rf"\(({NUM}),")
_FORM1_TAIL = re.compile(rf"\),\(({NUM}),({NUM})\)")

ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
ENTITY_PATTERN = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>")

ZERO_BOX: Box = (0.0, 0.0, 0.0, 0.0)


def _decimal_run_start(text: str, end: int) -> int:
    """Start of the run of ``\\d`` characters (Unicode decimal digits) that ends at ``end``."""
    start = end
    while start > 0 and text[start - 1].isdecimal():
        start -= 1
    return start


def _form1_tail_anchors(text: str) -> tuple[list[int], list[tuple[int, int, str, str]]]:
    """Positions k of ``),(C,D)`` whose pair parses, with the lowest start of the number before k.

    For each anchor the number B of form 1 can start anywhere in ``[low, k)`` except on a '.'
    (see :func:`_form1_findall`); ``low`` is the start of the longest NUM ending at k.
    """
    anchors: list[int] = []
    info: list[tuple[int, int, str, str]] = []
    start = 0
    while True:
        k = text.find("),(", start)
        if k < 0:
            break
        start = k + 1
        if k == 0 or not text[k - 1].isdecimal():
            continue
        tail = _FORM1_TAIL.match(text, k)
        if tail is None:
            continue
        low = _decimal_run_start(text, k)
        if low >= 2 and text[low - 1] == "." and text[low - 2].isdecimal():
            low = _decimal_run_start(text, low - 1)
        if low >= 1 and text[low - 1] == "-":
            low -= 1
        anchors.append(k)
        info.append((low, tail.end(), tail.group(1), tail.group(2)))
    return anchors, info


def _form1_findall(text: str) -> list[tuple[str, str, str, str]]:
    """What ``FORM1_PATTERN.findall(text)`` returns, in time near-linear in ``len(text)``.

    The regex, from a start ``(A,`` ending at q, takes the smallest j >= q on the same line where
    ``B),(C,D)`` matches; B is then ``text[j:k]`` for the anchor k that follows. Valid j form the
    run ``[low, k)`` before each anchor (a '.' inside it cannot start a number), and runs of
    different anchors do not overlap, so the smallest valid j >= q belongs to the first anchor
    k > q.
    """
    if "),(" not in text:
        return []
    anchors, info = _form1_tail_anchors(text)
    if not anchors:
        return []
    results: list[tuple[str, str, str, str]] = []
    pos = 0
    while True:
        s = text.find("(", pos)
        if s < 0:
            break
        head = _FORM1_HEAD.match(text, s)
        if head is None:
            pos = s + 1
            continue
        q = head.end()
        idx = bisect.bisect_right(anchors, q)
        if idx == len(anchors):
            break  # no anchor after q: no later start can match either
        k = anchors[idx]
        low, end, c_value, d_value = info[idx]
        j = max(low, q)
        if text[j] == ".":
            j += 1
        newline = text.find("\n", q, j)
        if newline >= 0:
            pos = s + 1
            continue
        results.append((head.group(1), text[j:k], c_value, d_value))
        pos = end
    return results


def _to_box(values: tuple[str, str, str, str]) -> Box:
    box = tuple(float(v) for v in values)
    # The released reader takes a box whose coordinates sum below 4 to be 0-1 relative.
    if sum(box) < 4:
        box = tuple(v * 1000 for v in box)
    return box  # type: ignore[return-value]


def find_box_reference(text: str) -> Box | None:
    """The released reader's box, or None when none of its four forms matches."""
    matches = _form1_findall(text)
    if not matches:
        for pattern in (_FORM2, _FORM3, _FORM4):
            matches = pattern.findall(text)
            if matches:
                break
    return _to_box(matches[-1]) if matches else None


def read_box_reference(text: str) -> Box:
    """Read a box exactly as the released KARL reward does; ``(0, 0, 0, 0)`` when none is found.

    >>> read_box_reference("<answer>(12,40),(300,520)</answer>")
    (12.0, 40.0, 300.0, 520.0)
    >>> read_box_reference("[0.1, 0.2, 0.3, 0.4]")
    (100.0, 200.0, 300.0, 400.0)
    >>> read_box_reference("no box here")
    (0.0, 0.0, 0.0, 0.0)
    """
    box = find_box_reference(text)
    return ZERO_BOX if box is None else box


def has_reference_pair_box(text: str) -> bool:
    """Whether form 1 ``(x1,y1),(x2,y2)`` occurs in ``text`` (the format reward's box check)."""
    return bool(_form1_findall(text))


def answer_span(response: str) -> str | None:
    """The first ``<answer>...</answer>`` span (shortest match, may span lines), or None.

    Same result as ``ANSWER_PATTERN.search`` but linear: the regex rescans to the end of the text
    from every ``<answer>`` when no ``</answer>`` follows (seconds on 100 KB of open tags).
    """
    start = response.find("<answer>")
    if start < 0:
        return None
    end = response.find("</answer>", start + 8)
    return None if end < 0 else response[start + 8 : end]


def entity_of(ground_truth: str) -> str | None:
    """The entity inside the ground truth's ``<|object_ref_start|>...<|object_ref_end|>``, or None."""
    match = ENTITY_PATTERN.search(ground_truth)
    return None if match is None else match.group(1).strip()


def box_iou(pred: Box, target: Box) -> float | None:
    """IoU of two boxes as written; ``None`` when the union has no positive area.

    Corners are not reordered (as in the released code); intersection width and height clamp at
    0. A NaN or infinite coordinate gives ``None``.

    >>> box_iou((0, 0, 10, 10), (5, 0, 15, 10))
    0.3333333333333333
    >>> box_iou((0, 0, 0, 0), (0, 0, 0, 0)) is None
    True
    """
    inter_w = max(0.0, min(pred[2], target[2]) - max(pred[0], target[0]))
    inter_h = max(0.0, min(pred[3], target[3]) - max(pred[1], target[1]))
    inter = inter_w * inter_h
    union = (pred[2] - pred[0]) * (pred[3] - pred[1]) + (target[2] - target[0]) * (target[3] - target[1]) - inter
    if not math.isfinite(union) or not math.isfinite(inter) or union <= 0:
        return None
    return inter / union


# ---------------------------------------------------------------------------------------------
# Opt-in reader for what current models write.

BoxFormat = Literal["reference", "qwen3_vl", "qwen25_vl_abs", "json"]
BOX_FORMATS: tuple[str, ...] = ("reference", "qwen3_vl", "qwen25_vl_abs", "json")

_BBOX_2D = re.compile(rf'"bbox_2d"\s*:\s*\[\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*\]')
_LIST4 = re.compile(rf"\[\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*\]")
_PAIRS = re.compile(rf"\(\s*({NUM})\s*,\s*({NUM})\s*\)\s*,?\s*\(\s*({NUM})\s*,\s*({NUM})\s*\)")
_TUPLE4 = re.compile(rf"\(\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*\)")


def _first_json_bbox(text: str) -> tuple[float, ...] | None:
    # Fenced blocks are the odd pieces between pairs of ``` (split is linear; a lazy regex is not).
    pieces = text.split("```")
    fenced = [pieces[i].removeprefix("json").strip() for i in range(1, len(pieces) - 1, 2)]
    for block in [*fenced, text]:
        try:
            data = json.loads(block)
        except (ValueError, RecursionError):
            data = None
        items = data if isinstance(data, list) else [data]
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("bbox_2d"), list) and len(item["bbox_2d"]) == 4:
                try:
                    return tuple(float(v) for v in item["bbox_2d"])
                except (TypeError, ValueError):
                    continue
    match = _BBOX_2D.search(text)
    return None if match is None else tuple(float(v) for v in match.groups())


#: Qwen2.5-VL's processor defaults (preprocessor_config.json of the released checkpoints, and
#: qwen_vl_utils): the pixel range an image is resized into before the model sees it.
QWEN25_MIN_PIXELS = 56 * 56
QWEN25_MAX_PIXELS = 28 * 28 * 16384
#: (min_pixels, max_pixels) as ``qwen25_vl_abs`` readers take them.
QWEN25_PIXELS: tuple[int, int] = (QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = QWEN25_MIN_PIXELS,
                 max_pixels: int = QWEN25_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2.5-VL's input resize (height, width): the grid its absolute coordinates refer to.

    ``min_pixels`` / ``max_pixels`` must be those the model's processor ran with (many setups
    lower ``max_pixels``, e.g. to 28 * 28 * 1280).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def read_box(
    text: str,
    box_format: BoxFormat = "reference",
    *,
    image_size: tuple[int, int] | None = None,
    resized_size: tuple[int, int] | None = None,
    pixels: tuple[int, int] = QWEN25_PIXELS,
) -> Box | None:
    """Read one box on the 0-1000 grid from model text; None when the text holds no box.

    ``box_format``:
      * ``"reference"``: the released reader (:func:`find_box_reference`; its (0, 0, 0, 0) for
        "no box" is left to the caller, see :func:`read_box_reference`).
      * ``"qwen3_vl"``: 0-1000 coordinates; JSON ``bbox_2d`` first, then the last
        ``[x1, y1, x2, y2]``, ``(x1,y1),(x2,y2)`` or ``(x1, y1, x2, y2)`` with any spacing.
      * ``"json"``: only JSON ``bbox_2d`` (bare or inside a json code fence), 0-1000.
      * ``"qwen25_vl_abs"``: as ``qwen3_vl`` but in absolute pixels of the model's resized
        input. Give ``resized_size`` (width, height) of the model input, or ``image_size``
        (width, height) of the original image, which is resized with :func:`smart_resize` into
        ``pixels`` = (min_pixels, max_pixels) of the processor the model ran with.
    """
    if box_format == "reference":
        return find_box_reference(text)
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format: expected one of {BOX_FORMATS}, got {box_format!r}")
    values = _first_json_bbox(text)
    if values is None and box_format != "json":
        for pattern in (_LIST4, _PAIRS, _TUPLE4):
            found = pattern.findall(text)
            if found:
                values = tuple(float(v) for v in found[-1])
                break
    if values is None or not all(math.isfinite(v) for v in values):
        return None
    if box_format == "qwen25_vl_abs":
        if resized_size is None:
            if image_size is None:
                raise ValueError("box_format 'qwen25_vl_abs' needs image_size or resized_size (width, height)")
            resized_h, resized_w = smart_resize(int(image_size[1]), int(image_size[0]), min_pixels=int(pixels[0]),
                                                max_pixels=int(pixels[1]))
        else:
            resized_w, resized_h = resized_size
        values = (
            values[0] * 1000 / resized_w,
            values[1] * 1000 / resized_h,
            values[2] * 1000 / resized_w,
            values[3] * 1000 / resized_h,
        )
    return values  # type: ignore[return-value]
