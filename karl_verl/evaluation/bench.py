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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from karl_verl.evaluation.metrics import (
    ACC_THRESHOLD,
    BenchMetrics,
    CaseResult,
    aggregate,
    ground_truth_boxes,
    score_response,
)
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


def load_bench(path: str | Path, *, progress: bool = True) -> list[BenchCase]:
    """Read and validate every case (images are decoded once, so a corrupt one fails here)."""
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
                case = _bench_case(record, Location(name, row), path.parent)
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


def _bench_case(record: Mapping[str, Any], where: Location, root: Path) -> BenchCase:
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
    boxes, entity = _answer_boxes(record["answer"], where)
    return BenchCase(
        question_id=str(qid).strip(),
        row=where.row,
        question=question,
        image=image.read(),
        width=width,
        height=height,
        category=category.strip().lower(),
        entity=entity,
        boxes=tuple(boxes),
    )


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


def bench_requests(cases: Sequence[BenchCase], prompt_style: str = "karl") -> list[GenerationRequest]:
    """One generation request per case: the question with its ``<image>`` and the style's suffix."""
    from karl_verl.backends.base import GenerationRequest

    return [
        GenerationRequest(
            messages=prompts.chat_messages(prompts.grounding_prompt(case.question, 1, prompt_style)),
            images=[case.image],
        )
        for case in cases
    ]


def predict(
    cases: Sequence[BenchCase],
    generator: TextGenerator,
    sampling: SamplingSettings,
    *,
    prompt_style: str = "karl",
    chunk_size: int | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Run ``generator`` on every case (first of ``sampling.n`` texts); question id -> response."""
    from karl_verl.evaluation.inference import generate_all

    outputs = generate_all(generator, bench_requests(cases, prompt_style), sampling,
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
) -> list[CaseResult]:
    """Score every case; a case with no response is a missing prediction."""
    results = []
    for case in cases:
        response = responses.get(case.question_id)
        score = score_response(response, case.boxes, box_format, (case.width, case.height), threshold, abs_pixels)
        level = None
        if mastery is not None and case.entity is not None:
            level = mastery.level_of(case.entity)
        results.append(CaseResult(
            question_id=case.question_id,
            category=case.category,
            entity=case.entity,
            iou=score.iou,
            correct=score.correct,
            parsed=score.parsed,
            missing=response is None,
            box=score.box,
            level=level,
        ))
    return results


def evaluate(
    cases: Sequence[BenchCase],
    responses: Mapping[str, str],
    *,
    box_format: str = "qwen3_vl",
    seen_categories: Sequence[str],
    unseen_categories: Sequence[str],
    mastery: MasteryTable | None = None,
    abs_pixels: tuple[int, int] = QWEN25_PIXELS,
) -> tuple[BenchMetrics, list[CaseResult]]:
    """Score and aggregate: the figures of Table 1 (and the knowledge split with ``mastery``)."""
    results = score_cases(cases, responses, box_format=box_format, mastery=mastery, abs_pixels=abs_pixels)
    metrics = aggregate(results, seen_categories, unseen_categories, with_knowledge=mastery is not None)
    return metrics, results
