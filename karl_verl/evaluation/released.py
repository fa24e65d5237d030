"""The released KVG-Bench evaluator's scoring rules (``--protocol released``), one function per rule.

Every published KVG-Bench figure was produced by the evaluator released with the paper; a run
reported beside those figures has to be scored the same way, quirks included. The rules, in the
order a case meets them:

1. **Ground truth**: the first ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` whose four fields are
   digits only (possibly empty, which the original cannot convert: an input error here); later
   boxes are ignored. The entity is the first ``<|object_ref_start|>...<|object_ref_end|>``, as
   written (not stripped); a case without one is an input error.
2. **Answer text**: the first ``<answer>...</answer>`` lying on one line, stripped; when there is
   none, the whole response. Then, when the text contains ````json``, the content of the first
   fence (which may span lines).
3. **Box**: nine patterns (:data:`BOX_PATTERNS`) tried in order; the first with any match wins
   and its *last* match is used. The four groups go through ``float()`` (``[`` and ``x`` removed
   from the first); any failure gives ``(0,0,0,0)``. A sum of the four values below 4 multiplies
   them by 1000. No match at all gives ``(0,0,0,0)``.
4. **IoU** in float32: areas ``(x2-x1)*(y2-y1)`` not clamped (reversed corners give negative
   areas), intersection width and height clamped at 0, ``inter / union`` (may be NaN, infinite or
   negative).
5. **Running maximum** from 0 over the ground-truth boxes (one here), replaced only by a strictly
   larger IoU: NaN and values <= 0 leave 0.
6. **Correct** iff that maximum ``>= 0.5``.
7. **Knowledge split**: per (table, level) counts, summed into high/low with ``int(Num * Acc)``
   (:func:`truncated_correct`), which can drop a case to floating-point truncation.

Pure module: the regular expressions and numpy (float32 arithmetic); no torch, no verl.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from karl_verl.data.prompts import ANSWER_FORMAT_SUFFIX, IMAGE_PLACEHOLDER, SUFFIX_SEPARATOR

KARL_PROTOCOL = "karl"
RELEASED_PROTOCOL = "released"
#: Scoring protocols of ``karl-verl eval``; the first is the default.
PROTOCOLS: tuple[str, ...] = (KARL_PROTOCOL, RELEASED_PROTOCOL)

#: The released evaluator's correctness threshold (inclusive), applied to a float32 IoU.
RELEASED_THRESHOLD = 0.5
#: The released inference's vLLM context length (prompt with image tokens, plus the answer).
RELEASED_MAX_MODEL_LEN = 17920

GROUND_TRUTH_BOX = re.compile(r"<\|box_start\|>\(([0-9]*?),([0-9]*?)\),\(([0-9]*?),([0-9]*?)\)<\|box_end\|>")
ENTITY_MARKER = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>")
# No DOTALL: an answer span that crosses a line break is not an answer span.
ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>")
JSON_FENCE_MARK = "```json"
JSON_FENCE = re.compile(r"```json(.*?)```", re.DOTALL)

#: The nine box patterns, in the order they are tried (their text is the protocol).
BOX_PATTERNS: tuple[re.Pattern[str], ...] = tuple(re.compile(p) for p in (
    r"<answer>.*?\((\d*?),.*?(\d*?)\),\((\d*?),(\d*?)\)</answer>",
    r"So the answer is.*?\((\d*?),.*?(\d*?)\),\((\d*?),(\d*?)\)",
    r"\((\d*?),.*?(\d*?)\),\((\d*?),(\d*?)\)",
    r"\((.*?),.*?(.*?)\).*?\((.*?),.*?(.*?)\)",
    r"\[(\d*?), (\d*?), (\d*?), (\d*?)\]",
    r"\[(.*?), (.*?), (.*?), (.*?)\]",
    r"\((\d*?), (\d*?), (\d*?), (\d*?)\)",
    r"\((\d*?), (\d*?)\)\n?.*?\((\d*?), (\d*?)\)",
    r"\[\[(\d*?),(\d*?),(\d*?),(\d*?)\]\]",
))

#: A box as the released reader returns it (Python floats, possibly NaN or infinite).
ReleasedBox = tuple[float, float, float, float]
NO_BOX: ReleasedBox = (0.0, 0.0, 0.0, 0.0)


def ground_truth_box(answer: str) -> ReleasedBox:
    """The first integer ground-truth box; ``ValueError`` (the reason) where the original crashes.

    >>> ground_truth_box("<|box_start|>(1.5,2),(3,4)<|box_end|><|box_start|>(10,20),(30,40)<|box_end|>")
    (10.0, 20.0, 30.0, 40.0)
    """
    match = GROUND_TRUTH_BOX.search(answer)
    if match is None:
        raise ValueError("no integer ground-truth box <|box_start|>(x1,y1),(x2,y2)<|box_end|> in the answer")
    if not all(match.groups()):
        raise ValueError(f"the first ground-truth box {match.group(0)!r} has an empty coordinate")
    return tuple(float(v) for v in match.groups())  # type: ignore[return-value]


def ground_truth_entity(answer: str) -> str:
    """The first entity marker's content, as written; ``ValueError`` when there is none."""
    match = ENTITY_MARKER.search(answer)
    if match is None:
        raise ValueError("no entity <|object_ref_start|>...<|object_ref_end|> in the answer")
    return match.group(1)


def answer_text(response: str) -> str:
    """The text the box is read from: the one-line answer span (or everything), then the json fence.

    >>> answer_text("<answer>\\n(1,2),(3,4)\\n</answer>")  # a multi-line span is no span
    '<answer>\\n(1,2),(3,4)\\n</answer>'
    """
    spans = ANSWER_SPAN.findall(response)
    text = spans[0].strip() if spans else response
    if JSON_FENCE_MARK in text:
        fence = JSON_FENCE.search(text)
        if fence is not None:
            text = fence.group(1)
    return text


def read_box(text: str) -> tuple[ReleasedBox, int]:
    """The box and the number (1-9) of the pattern that gave it; pattern 0 means none matched.

    >>> read_box("So the answer is (1,2),(3,4).\\n<answer>\\n(5,6),(7,8)\\n</answer>")
    ((1.0, 2.0, 3.0, 4.0), 2)
    >>> read_box("(0.1, 0.2), (0.5, 0.6)")  # pattern 4; the sum is below 4, so 0-1 relative
    ((100.0, 200.0, 500.0, 600.0), 4)
    """
    for number, pattern in enumerate(BOX_PATTERNS, start=1):
        matches = pattern.findall(text)
        if not matches:
            continue
        x1, y1, x2, y2 = matches[-1]
        try:
            values: tuple[float, ...] = (float(x1.replace("[", "").replace("x", "")), float(y1), float(x2), float(y2))
        except ValueError:  # float() of a str raises nothing else
            values = NO_BOX
        if sum(values) < 4:
            values = tuple(v * 1000 for v in values)
        return values, number  # type: ignore[return-value]
    return NO_BOX, 0


def iou_float32(pred: np.ndarray | Sequence[float], target: np.ndarray | Sequence[float]) -> np.ndarray:
    """Row-wise float32 IoU of ``(N, 4)`` boxes (or one box each), computed as the original does.

    Values are rounded to float32 first; every operation then stays in float32. The result may
    hold NaN, infinities and negative values.

    >>> float(iou_float32((0, 0, 10, 10), (0, 0, 10, 5))[0])
    0.5
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    t = np.asarray(target, dtype=np.float64).reshape(-1, 4)
    with np.errstate(all="ignore"):  # overflow to inf and 0/0 are part of the rule
        p, t = p.astype(np.float32), t.astype(np.float32)
        area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
        area_t = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
        lower = np.maximum(p[:, :2], t[:, :2])
        upper = np.minimum(p[:, 2:], t[:, 2:])
        wh = np.maximum(upper - lower, np.float32(0))
        inter = wh[:, 0] * wh[:, 1]
        union = area_p + area_t - inter
        return inter / union


def running_max(ious: np.ndarray) -> np.ndarray:
    """The original's ``max_iou``: 0 unless the IoU is strictly above 0 (NaN compares false)."""
    values = np.asarray(ious, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(values > 0, values, 0.0)


@dataclass(frozen=True)
class ReleasedScore:
    """One response scored by the released rules."""

    iou: float
    correct: bool
    box: ReleasedBox
    pattern: int


def score_responses(responses: Sequence[str], targets: Sequence[ReleasedBox]) -> list[ReleasedScore]:
    """Score responses against their (single) ground-truth boxes; one float32 pass over all cases."""
    if len(responses) != len(targets):
        raise ValueError(f"{len(responses)} responses for {len(targets)} ground-truth boxes")
    read = [read_box(answer_text(response)) for response in responses]
    if not read:
        return []
    ious = running_max(iou_float32([box for box, _ in read], targets))
    return [ReleasedScore(iou=float(iou), correct=bool(iou >= RELEASED_THRESHOLD), box=box, pattern=number)
            for (box, number), iou in zip(read, ious.tolist(), strict=True)]


def score_response(response: str, target: ReleasedBox) -> ReleasedScore:
    """:func:`score_responses` for one case."""
    return score_responses([response], [target])[0]


def truncated_correct(num: int, correct: int) -> int:
    """Correct cases of one (table, level) group as the original recounts them: ``int(Num * Acc)``.

    >>> truncated_correct(22, 15)  # 22 * (15 / 22) is 14.999999999999998 in binary floating point
    14
    """
    return int(num * (correct / num)) if num else 0


def prompt_text(question: str) -> str:
    """The user text of the released inference: ``<image>`` prepended when absent (it stays in the
    text, beside the image part), two spaces, then the answer-format instruction.

    >>> prompt_text("Find X")  # doctest: +NORMALIZE_WHITESPACE
    '<image>Find X  Output the thinking process in <think> </think> and final answer (bounding box) in
    <answer> </answer> tags.'
    """
    query = question if IMAGE_PLACEHOLDER in question else IMAGE_PLACEHOLDER + question
    return query + SUFFIX_SEPARATOR + ANSWER_FORMAT_SUFFIX


def chat_messages(question: str) -> list[dict[str, object]]:
    """One user turn: the image part, then :func:`prompt_text` as a text part (``<image>`` kept as text)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text(question)}]}]
