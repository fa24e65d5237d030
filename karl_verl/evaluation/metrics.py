"""Scoring grounding responses: Acc@0.5 and IoU per case, and their aggregation over groups.

Rules (KARL_METHOD.md section 6):

* the box is read from the first ``<answer>...</answer>`` span when there is one, else from the
  whole response, with :func:`karl_verl.boxes.read_box` in the chosen format (default
  ``qwen3_vl``: 0-1000 coordinates);
* no box read = unparseable = IoU 0, a miss (counted apart);
* several ground-truth boxes: the best IoU over them;
* a case without a prediction = IoU 0, a miss (counted apart);
* correct when IoU >= 0.5 (inclusive);
* averages over several categories weight each case equally (i.e. categories by case count).

Pure module: no torch, no verl.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from karl_verl.boxes import NUM, QWEN25_PIXELS, Box, answer_span, box_iou, read_box
from karl_verl.mastery import HIGH_KNOWLEDGE_LEVELS, NUM_LEVELS

#: Acc@0.5: a prediction is correct when its IoU is at least this (inclusive).
ACC_THRESHOLD = 0.5
#: Box formats the evaluator reads; ``qwen3_vl`` is the default.
EVAL_BOX_FORMATS: tuple[str, ...] = ("qwen3_vl", "qwen25_vl_abs", "json", "reference")
#: How high/low knowledge correct counts are summed (see :func:`aggregate`).
KNOWLEDGE_ARITHMETIC: tuple[str, ...] = ("exact", "released")

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


@dataclass
class GroupMetrics:
    """Counts over a group of cases; accuracy and mean IoU weight every case equally."""

    n: int = 0
    correct: int = 0
    iou_sum: float = 0.0
    unparseable: int = 0
    missing: int = 0

    def add(self, iou: float, correct: bool, parsed: bool, missing: bool) -> None:
        self.n += 1
        self.correct += int(correct)
        self.iou_sum += iou
        # A missing prediction is counted as missing, not also as unparseable.
        self.missing += int(missing)
        self.unparseable += int(not parsed and not missing)

    @property
    def acc(self) -> float | None:
        """Acc@0.5 as a fraction, None for an empty group."""
        return self.correct / self.n if self.n else None

    @property
    def mean_iou(self) -> float | None:
        return self.iou_sum / self.n if self.n else None

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "correct": self.correct,
            "acc": self.acc,
            "mean_iou": self.mean_iou,
            "unparseable": self.unparseable,
            "missing": self.missing,
        }


@dataclass(frozen=True)
class CaseResult:
    """A scored benchmark case."""

    question_id: str
    category: str
    entity: str | None
    iou: float
    correct: bool
    parsed: bool
    missing: bool
    box: Box | None
    level: int | None = None
    #: ``--knowledge-dir``: the table the level came from (``train``, ``trainood`` or ``testood``).
    knowledge_table: str | None = None
    #: ``--protocol released``: the number (1-9) of the box pattern that matched, 0 for none.
    pattern: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "question_id": self.question_id,
            "category": self.category,
            "entity": self.entity,
            "iou": self.iou,
            "correct": self.correct,
            "parsed": self.parsed,
            "missing": self.missing,
            # NaN and infinite coordinates (the released reader's float()) are written as strings.
            "pred_box": None if self.box is None else [v if math.isfinite(v) else repr(v) for v in self.box],
            "knowledge_level": self.level,
            "knowledge_table": self.knowledge_table,
            "pattern": self.pattern,
        }


@dataclass
class BenchMetrics:
    """Per category, seen / unseen / overall, and (with a mastery table) per knowledge level."""

    categories: dict[str, GroupMetrics] = field(default_factory=dict)
    seen: GroupMetrics = field(default_factory=GroupMetrics)
    unseen: GroupMetrics = field(default_factory=GroupMetrics)
    overall: GroupMetrics = field(default_factory=GroupMetrics)
    other_categories: list[str] = field(default_factory=list)
    #: Only with a mastery table: "high" (levels 1-3), "low" (4-5), the same per domain ("seen high",
    #: "seen low", "unseen high", "unseen low"), and per level "1".."5".
    knowledge: dict[str, GroupMetrics] | None = None
    #: How the high/low correct counts were summed: ``exact``, or ``released`` (``int(Num * Acc)``
    #: per table and level, as the released evaluator does).
    knowledge_arithmetic: str = "exact"
    #: Cases whose entity is not in the mastery table (left out of the knowledge split).
    not_in_table: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "categories": {name: group.to_json() for name, group in self.categories.items()},
            "seen": self.seen.to_json(),
            "unseen": self.unseen.to_json(),
            "overall": self.overall.to_json(),
            "other_categories": self.other_categories,
            "knowledge": None,
        }
        if self.knowledge is not None:
            out["knowledge"] = {name: group.to_json() for name, group in self.knowledge.items()}
            out["knowledge"]["not_in_table"] = self.not_in_table
            out["knowledge"]["arithmetic"] = self.knowledge_arithmetic
        return out


def aggregate(
    results: Iterable[CaseResult],
    seen_categories: Sequence[str],
    unseen_categories: Sequence[str],
    *,
    with_knowledge: bool = False,
    high_levels: Iterable[int] = HIGH_KNOWLEDGE_LEVELS,
    knowledge_arithmetic: str = "exact",
) -> BenchMetrics:
    """Group case results by category, seen / unseen, overall and (``with_knowledge``) level.

    Categories are listed seen first, then unseen (each in the order given), then any other
    category in the data (counted in ``overall`` only). With ``knowledge_arithmetic="released"``
    the high/low correct counts are the released evaluator's: per (domain, table, level) group
    ``int(n * (correct / n))``, summed.
    """
    if knowledge_arithmetic not in KNOWLEDGE_ARITHMETIC:
        raise ValueError(f"knowledge arithmetic: expected one of {KNOWLEDGE_ARITHMETIC}, got {knowledge_arithmetic!r}")
    high = frozenset(high_levels)
    metrics = BenchMetrics(knowledge_arithmetic=knowledge_arithmetic)
    cells: dict[tuple[str | None, str | None, int], GroupMetrics] = {}
    order = {name: i for i, name in enumerate([*seen_categories, *unseen_categories])}
    by_category: dict[str, GroupMetrics] = {}
    if with_knowledge:
        levels = {str(level): GroupMetrics() for level in range(1, NUM_LEVELS + 1)}
        bands = {f"{domain}{band}": GroupMetrics() for domain in ("", "seen ", "unseen ") for band in ("high", "low")}
        metrics.knowledge = {**bands, **levels}
    for result in results:
        values = (result.iou, result.correct, result.parsed, result.missing)
        by_category.setdefault(result.category, GroupMetrics()).add(*values)
        metrics.overall.add(*values)
        domain = None
        if result.category in seen_categories:
            metrics.seen.add(*values)
            domain = "seen"
        elif result.category in unseen_categories:
            metrics.unseen.add(*values)
            domain = "unseen"
        if metrics.knowledge is not None:
            if result.level is None:
                metrics.not_in_table += 1
            else:
                band = "high" if result.level in high else "low"
                metrics.knowledge[band].add(*values)
                if domain is not None:
                    metrics.knowledge[f"{domain} {band}"].add(*values)
                metrics.knowledge[str(result.level)].add(*values)
                cells.setdefault((domain, result.knowledge_table, result.level), GroupMetrics()).add(*values)
    if metrics.knowledge is not None and knowledge_arithmetic == "released":
        from karl_verl.evaluation.released import truncated_correct

        for name in ("high", "low", "seen high", "seen low", "unseen high", "unseen low"):
            domain_name, _, band = name.rpartition(" ")
            metrics.knowledge[name].correct = sum(
                truncated_correct(cell.n, cell.correct) for (domain, _table, level), cell in cells.items()
                if (level in high) == (band == "high") and domain_name in ("", domain))
    metrics.categories = dict(sorted(by_category.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    metrics.other_categories = [name for name in metrics.categories if name not in order]
    return metrics
