"""KVG-Bench: reading the benchmark and predictions, running a model on it, and scoring.

Benchmark parquet in the released format (KARL_METHOD.md section 6), one row per case:
``question_id`` (string or integer, unique), ``question`` (the query; an ``<image>`` placeholder
is prepended when absent), ``image`` (a struct whose ``bytes`` field holds the encoded image; a
``path`` field is used when ``bytes`` is empty), ``answer`` (entity marker then one or more boxes
``(x1,y1),(x2,y2)`` on the 0-1000 grid; a list of such strings is accepted too) and ``category``
(lower-cased on reading).

Predictions JSONL: one object per line, ``{"question_id": ..., "response": "<full model text>"}``.
A case without a prediction is a miss; a prediction for an unknown question id is counted and
ignored; two predictions for one id are an error.

Under ``protocol="released"`` (:mod:`karl_verl.evaluation.released`) a case is read as the released
evaluator reads it: ``answer`` must be a string, its first integer ground-truth box is the only box
(not checked against the grid: the original scores reversed or off-grid boxes as they are), the
entity is taken as written and the category is not lower-cased. What the original would crash on
(no integer box, no entity marker, an unknown category, a missing prediction) is an error naming
the question id (:func:`check_released_categories`, :func:`check_released_predictions`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karl_verl.accuracy import ACC_THRESHOLD, ground_truth_boxes, score_response
from karl_verl.boxes import QWEN25_PIXELS, Box, entity_of
from karl_verl.data import prompts
from karl_verl.data.schema import (
    DataError,
    Location,
    image_ref_from_value,
    iter_jsonl_objects,
    open_parquet,
    probe_image,
)
from karl_verl.evaluation import released
from karl_verl.evaluation.knowledge import KnowledgeTables
from karl_verl.evaluation.metrics import BenchMetrics, CaseResult, aggregate
from karl_verl.mastery import MasteryTable

if TYPE_CHECKING:
    from karl_verl.backends.base import GenerationRequest, SamplingSettings, TextGenerator

BENCH_COLUMNS: tuple[str, ...] = ("question_id", "question", "image", "answer", "category")


@dataclass(frozen=True)
class BenchCase:
    """One benchmark case, validated."""

    question_id: str
    row: int
    question: str
    image: bytes
    width: int
    height: int
    category: str
    entity: str | None
    boxes: tuple[Box, ...]


def _answer_boxes(value: Any, where: Location) -> tuple[list[Box], str | None]:
    """Boxes and entity of an ``answer`` cell (a string, or a list of strings)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise where.error("answer", f"expected a string (or a list of strings) with boxes, got {value!r:.200}")
    boxes = [box for text in texts for box in ground_truth_boxes(text)]
    if not boxes:
        raise where.error("answer", f"no box (x1,y1),(x2,y2) found in {value!r:.200}")
    for box in boxes:
        if not all(math.isfinite(v) for v in box):
            raise where.error("answer", f"box {list(box)} is not finite")
        if not (0 <= box[0] < box[2] <= 1000 and 0 <= box[1] < box[3] <= 1000):
            raise where.error("answer", f"box {list(box)} is not an ordered box on the 0-1000 grid")
    entity = next((found for found in (entity_of(t) for t in texts) if found), None)
    return boxes, entity


def load_bench(path: str | Path, *, progress: bool = True, protocol: str = released.KARL_PROTOCOL) -> list[BenchCase]:
    """Read and validate every case (images are decoded once, so a corrupt one fails here)."""
    if protocol not in released.PROTOCOLS:
        raise ValueError(f"protocol: expected one of {released.PROTOCOLS}, got {protocol!r}")
    from tqdm import tqdm

    path = Path(path)
    name = path.name
    if not path.is_file():
        raise DataError(name, None, None, f"benchmark file not found: {path}")
    parquet = open_parquet(path, name)
    missing = [column for column in BENCH_COLUMNS if column not in parquet.schema_arrow.names]
    if missing:
        raise DataError(name, None, None, f"missing column(s) {missing}; expected {list(BENCH_COLUMNS)}")
    cases: list[BenchCase] = []
    first_row: dict[str, int] = {}
    row = 0
    with tqdm(total=parquet.metadata.num_rows, desc=f"read {name}", unit="case", disable=not progress) as bar:
        for batch in parquet.iter_batches(batch_size=64, columns=list(BENCH_COLUMNS)):
            for record in batch.to_pylist():
                row += 1
                case = _bench_case(record, Location(name, row), path.parent, protocol)
                if case.question_id in first_row:
                    first = first_row[case.question_id]
                    raise DataError(name, row, "question_id",
                                    f"duplicate question id {case.question_id!r} (first at row {first})")
                first_row[case.question_id] = row
                cases.append(case)
                bar.update(1)
    if not cases:
        raise DataError(name, None, None, "the benchmark has no rows")
    return cases


def _bench_case(record: Mapping[str, Any], where: Location, root: Path, protocol: str) -> BenchCase:
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or (isinstance(qid, str) and not qid.strip()):
        raise where.error("question_id", f"expected a non-empty string or an integer, got {qid!r}")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise where.error("question", f"expected a non-empty string, got {question!r:.200}")
    category = record["category"]
    if not isinstance(category, str) or not category.strip():
        raise where.error("category", f"expected a category name, got {category!r}")
    if record["image"] is None:
        raise where.error("image", "missing")
    image = image_ref_from_value(record["image"], where, root, "image")
    width, height = probe_image(image.data, image.path, where, "image")
    question_id = str(qid).strip()
    if protocol == released.RELEASED_PROTOCOL:
        boxes, entity = _released_answer(record["answer"], where, question_id)
    else:
        boxes, entity = _answer_boxes(record["answer"], where)
        category = category.strip().lower()
    return BenchCase(
        question_id=question_id,
        row=where.row,
        question=question,
        image=image.read(),
        width=width,
        height=height,
        category=category,
        entity=entity,
        boxes=tuple(boxes),
    )


def _released_answer(value: Any, where: Location, question_id: str) -> tuple[list[Box], str]:
    """The released reading of an ``answer`` cell: its first integer box and its entity as written."""
    if not isinstance(value, str):
        raise where.error("answer", f"question_id {question_id!r}: the released protocol reads one answer string, "
                                    f"got {value!r:.200}")
    try:
        return [released.ground_truth_box(value)], released.ground_truth_entity(value)
    except ValueError as err:
        raise where.error("answer", f"question_id {question_id!r}: {err} ({value!r:.200})") from None


def check_released_categories(cases: Sequence[BenchCase], categories: Sequence[str]) -> None:
    """Stop where the released evaluator would crash on a category it does not know (its names are
    compared as written); the error names the question id."""
    known = set(categories)
    for case in cases:
        if case.category not in known:
            raise DataError("benchmark", case.row, "category",
                            f"question_id {case.question_id!r}: unknown category {case.category!r} (the released "
                            f"protocol knows exactly {list(categories)})")


def check_released_predictions(cases: Sequence[BenchCase], responses: Mapping[str, str]) -> None:
    """Stop where the released evaluator would crash on a case without a prediction."""
    missing = [case.question_id for case in cases if case.question_id not in responses]
    if missing:
        shown = ", ".join(repr(qid) for qid in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError("predictions", None, None,
                        f"question_id {missing[0]!r}: no prediction; the released protocol scores every case and "
                        f"stops on a missing one ({len(missing)} missing: {shown})")


@dataclass
class Predictions:
    """Responses by question id, and what did not match the benchmark."""

    responses: dict[str, str]
    unknown_ids: list[str]


def load_predictions(path: str | Path, question_ids: Iterable[str]) -> Predictions:
    """Read a predictions JSONL; errors name the file, line and field."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise DataError(name, None, None, f"predictions file not found: {path}")
    known = set(question_ids)
    responses: dict[str, str] = {}
    first_line: dict[str, int] = {}
    unknown: list[str] = []
    for line_number, record in iter_jsonl_objects(path, name):
        qid = record.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise DataError(name, line_number, "question_id", f"expected a string or an integer, got {qid!r}")
        response = record.get("response")
        if not isinstance(response, str):
            raise DataError(name, line_number, "response", f"expected the model's text, got {response!r:.200}")
        qid = str(qid).strip()
        if qid in first_line:
            raise DataError(name, line_number, "question_id",
                            f"second prediction for {qid!r} (first at line {first_line[qid]})")
        first_line[qid] = line_number
        if qid in known:
            responses[qid] = response
        else:
            unknown.append(qid)
    return Predictions(responses=responses, unknown_ids=unknown)


def bench_requests(
    cases: Sequence[BenchCase], prompt_style: str = "karl", protocol: str = released.KARL_PROTOCOL
) -> list[GenerationRequest]:
    """One generation request per case: the question with its ``<image>`` and the style's suffix.

    Under the released protocol the prompt is the released inference's (``prompt_style`` unused):
    an image part, then the text with its literal ``<image>`` and the two-space template.
    """
    from karl_verl.backends.base import GenerationRequest

    def messages(question: str) -> list[dict[str, Any]]:
        if protocol == released.RELEASED_PROTOCOL:
            return released.chat_messages(question)
        return prompts.chat_messages(prompts.grounding_prompt(question, 1, prompt_style))

    return [GenerationRequest(messages=messages(case.question), images=[case.image]) for case in cases]


def predict(
    cases: Sequence[BenchCase],
    generator: TextGenerator,
    sampling: SamplingSettings,
    *,
    prompt_style: str = "karl",
    protocol: str = released.KARL_PROTOCOL,
    chunk_size: int | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Run ``generator`` on every case (first of ``sampling.n`` texts); question id -> response."""
    from karl_verl.generation import generate_all

    outputs = generate_all(generator, bench_requests(cases, prompt_style, protocol), sampling,
                           chunk_size=chunk_size, progress=progress, desc="KVG-Bench")
    return {case.question_id: texts[0] for case, texts in zip(cases, outputs, strict=True)}


def score_cases(
    cases: Sequence[BenchCase],
    responses: Mapping[str, str],
    *,
    box_format: str = "qwen3_vl",
    mastery: MasteryTable | None = None,
    threshold: float = ACC_THRESHOLD,
    abs_pixels: tuple[int, int] = QWEN25_PIXELS,
    protocol: str = released.KARL_PROTOCOL,
    knowledge: KnowledgeTables | None = None,
    seen_categories: Sequence[str] = (),
) -> list[CaseResult]:
    """Score every case; a case with no response is a missing prediction (karl protocol).

    Levels come from ``mastery`` (one table; an entity not in it has none) or from ``knowledge``
    (the released split, chosen by ``seen_categories``; an entity not in its table is an error).
    """
    if protocol == released.RELEASED_PROTOCOL:
        check_released_predictions(cases, responses)
        scores = released.score_responses([responses[case.question_id] for case in cases],
                                          [case.boxes[0] for case in cases])  # type: ignore[misc]
        outcome = [(s.iou, s.correct, s.pattern > 0, s.box, s.pattern) for s in scores]
    else:
        outcome = []
        for case in cases:
            response = responses.get(case.question_id)
            score = score_response(response, case.boxes, box_format, (case.width, case.height), threshold,
                                   abs_pixels)
            outcome.append((score.iou, score.correct, score.parsed, score.box, None))
    levels = case_levels(cases, knowledge, seen_categories) if knowledge is not None else None
    results = []
    for index, (case, (iou, correct, parsed, box, pattern)) in enumerate(zip(cases, outcome, strict=True)):
        level = table = None
        if levels is not None:
            table, level = levels[index]
        elif mastery is not None and case.entity is not None:
            level = mastery.level_of(case.entity)
        results.append(CaseResult(
            question_id=case.question_id,
            category=case.category,
            entity=case.entity,
            iou=iou,
            correct=correct,
            parsed=parsed,
            missing=case.question_id not in responses,
            box=box,
            level=level,
            knowledge_table=table,
            pattern=pattern,
        ))
    return results


def case_levels(
    cases: Sequence[BenchCase], knowledge: KnowledgeTables, seen_categories: Sequence[str]
) -> list[tuple[str, int]]:
    """(table key, level) of every case in the released split; an entity absent from its table, or a
    case without an entity, is an error naming the question id and the entity."""
    seen = set(seen_categories)
    levels = []
    for case in cases:
        if case.entity is None:
            raise DataError("benchmark", case.row, "answer",
                            f"question_id {case.question_id!r}: no entity marker, so no knowledge level")
        levels.append(knowledge.level_of(case.entity, case.category in seen, question_id=case.question_id))
    return levels


def evaluate(
    cases: Sequence[BenchCase],
    responses: Mapping[str, str],
    *,
    box_format: str = "qwen3_vl",
    seen_categories: Sequence[str],
    unseen_categories: Sequence[str],
    mastery: MasteryTable | None = None,
    abs_pixels: tuple[int, int] = QWEN25_PIXELS,
    protocol: str = released.KARL_PROTOCOL,
    knowledge: KnowledgeTables | None = None,
) -> tuple[BenchMetrics, list[CaseResult]]:
    """Score and aggregate: the figures of Table 1 (and the knowledge split with ``mastery`` or
    ``knowledge``; under the released protocol its high/low counts use the released arithmetic)."""
    results = score_cases(cases, responses, box_format=box_format, mastery=mastery, abs_pixels=abs_pixels,
                          protocol=protocol, knowledge=knowledge, seen_categories=seen_categories)
    arithmetic = "released" if protocol == released.RELEASED_PROTOCOL else "exact"
    metrics = aggregate(results, seen_categories, unseen_categories,
                        with_knowledge=mastery is not None or knowledge is not None, knowledge_arithmetic=arithmetic)
    return metrics, results
