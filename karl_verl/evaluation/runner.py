"""``karl-verl eval`` end to end: read, (run the model,) score, and write the report files.

Files written to the output folder, each atomically:

* ``metrics.json``: every figure (fractions) plus inputs and settings;
* ``cases.jsonl``: one scored case per line (IoU, correct, parsed, missing, predicted box, level);
* ``kvg_bench.png``: bar chart of Acc@0.5 beside the paper's rows;
* ``predictions.jsonl``: only when a model was run, in the format ``--predictions`` reads.

:func:`run_compare` (``eval --compare``) pairs two runs case by case and writes ``compare.json``
and ``compare.png`` (:mod:`karl_verl.evaluation.compare`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from karl_verl.accuracy import ACC_THRESHOLD
from karl_verl.boxes import QWEN25_PIXELS
from karl_verl.evaluation import released, report
from karl_verl.evaluation.bench import (
    case_levels,
    check_released_categories,
    check_released_predictions,
    evaluate,
    load_bench,
    load_predictions,
    predict,
    score_cases,
)
from karl_verl.evaluation.compare import (
    DEFAULT_BOOTSTRAP_SEED,
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Comparison,
    RunCases,
    compare_runs,
    format_comparison,
    plot_comparison,
    write_comparison,
)
from karl_verl.evaluation.knowledge import KnowledgeTables
from karl_verl.evaluation.metrics import BenchMetrics
from karl_verl.evaluation.paper import DEFAULT_PAPER_ROWS, SEEN_CATEGORIES, UNSEEN_CATEGORIES
from karl_verl.mastery import MasteryTable

if TYPE_CHECKING:
    from karl_verl.backends.base import SamplingSettings, TextGenerator

METRICS_FILE = "metrics.json"
CASES_FILE = "cases.jsonl"
CHART_FILE = "kvg_bench.png"
PREDICTIONS_FILE = "predictions.jsonl"


def _source(table: str | Path | MasteryTable | None) -> str | None:
    return None if table is None else str(table) if isinstance(table, (str, Path)) else "<table>"


def protocol_label(protocol: str) -> str:
    """How the table, the chart and the summary name the scoring rules."""
    if protocol == released.RELEASED_PROTOCOL:
        return "protocol: released (the released KARL evaluator's rules, comparable with the paper)"
    return "protocol: karl (karl-verl's rules; see docs/EVALUATION.md for how they differ from the released ones)"


@dataclass
class EvalOutcome:
    """What an evaluation produced."""

    metrics: BenchMetrics
    table: str
    details: str
    out_dir: Path
    num_cases: int
    unknown_predictions: int
    predictions_path: Path | None
    protocol: str = released.KARL_PROTOCOL

    def format(self) -> str:
        overall = self.metrics.overall
        lines = [
            f"KVG-Bench Acc@0.5 (%), {protocol_label(self.protocol)}",
            self.table,
            "",
            self.details,
            "",
            f"{self.num_cases} cases: {overall.missing} without a prediction, {overall.unparseable} unparseable "
            f"(both scored as misses); {self.unknown_predictions} predictions for unknown question ids ignored",
        ]
        if self.predictions_path is not None:
            lines.append(f"predictions saved to {self.predictions_path}")
        lines.append(f"wrote {self.out_dir / METRICS_FILE}, {self.out_dir / CASES_FILE}, {self.out_dir / CHART_FILE}")
        return "\n".join(lines)


def run_eval(
    bench: str | Path,
    out_dir: str | Path,
    *,
    predictions: str | Path | None = None,
    generator: TextGenerator | None = None,
    sampling: SamplingSettings | None = None,
    prompt_style: str = "karl",
    chunk_size: int | None = None,
    box_format: str = "qwen3_vl",
    abs_pixels: tuple[int, int] = QWEN25_PIXELS,
    mastery: str | Path | MasteryTable | None = None,
    knowledge_dir: str | Path | KnowledgeTables | None = None,
    protocol: str = released.KARL_PROTOCOL,
    seen_categories: Sequence[str] = SEEN_CATEGORIES,
    unseen_categories: Sequence[str] = UNSEEN_CATEGORIES,
    name: str = "this run",
    paper_rows: Sequence[str] = DEFAULT_PAPER_ROWS,
    context: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalOutcome:
    """Evaluate ``predictions`` (a JSONL path) or a ``generator`` on the benchmark at ``bench``.

    Every input check (benchmark, tables, and under the released protocol the cases the released
    evaluator would crash on) runs before anything is written to ``out_dir``.
    """
    if (predictions is None) == (generator is None):
        raise ValueError("give either predictions or a generator")
    if protocol not in released.PROTOCOLS:
        raise ValueError(f"protocol: expected one of {released.PROTOCOLS}, got {protocol!r}")
    if mastery is not None and knowledge_dir is not None:
        raise ValueError("give either a mastery table or a knowledge folder, not both")
    if mastery is not None and protocol == released.RELEASED_PROTOCOL:
        raise ValueError("the released protocol's knowledge split reads a knowledge folder (--knowledge-dir), "
                         "not one mastery table")
    overlap = sorted(set(seen_categories) & set(unseen_categories))
    if overlap:
        raise ValueError(f"categories both seen and unseen: {overlap}")
    out_dir = Path(out_dir)
    cases = load_bench(bench, progress=progress, protocol=protocol)
    if protocol == released.RELEASED_PROTOCOL:
        check_released_categories(cases, [*seen_categories, *unseen_categories])
    # Read the tables before any inference, so a bad table fails in seconds rather than hours.
    table = MasteryTable.load(mastery) if isinstance(mastery, (str, Path)) else mastery
    knowledge = KnowledgeTables.load(knowledge_dir) if isinstance(knowledge_dir, (str, Path)) else knowledge_dir
    if knowledge is not None:
        case_levels(cases, knowledge, seen_categories)
    predictions_path = None
    if generator is not None:
        from karl_verl.backends.base import SamplingSettings

        sampling = sampling or SamplingSettings()
        responses = predict(cases, generator, sampling, prompt_style=prompt_style, protocol=protocol,
                            chunk_size=chunk_size, progress=progress)
        predictions_path = out_dir / PREDICTIONS_FILE
        report.write_jsonl(predictions_path,
                           [{"question_id": qid, "response": text} for qid, text in responses.items()])
        unknown = 0
    else:
        loaded = load_predictions(predictions, (case.question_id for case in cases))  # type: ignore[arg-type]
        responses, unknown = loaded.responses, len(loaded.unknown_ids)
        if protocol == released.RELEASED_PROTOCOL:
            check_released_predictions(cases, responses)

    metrics, results = evaluate(cases, responses, box_format=box_format, seen_categories=seen_categories,
                                unseen_categories=unseen_categories, mastery=table, abs_pixels=abs_pixels,
                                protocol=protocol, knowledge=knowledge)
    columns = report.table_columns(seen_categories, unseen_categories, metrics.other_categories)
    rows = report.comparison_rows(metrics, name, paper_rows)
    released_rules = protocol == released.RELEASED_PROTOCOL
    settings = {
        "protocol": protocol,
        "name": name,
        "bench": str(bench),
        "predictions": None if predictions is None else str(predictions),
        "box_format": None if released_rules else box_format,
        "abs_pixels": list(abs_pixels) if box_format == "qwen25_vl_abs" and not released_rules else None,
        "threshold": released.RELEASED_THRESHOLD if released_rules else ACC_THRESHOLD,
        "seen_categories": list(seen_categories),
        "unseen_categories": list(unseen_categories),
        "mastery": _source(mastery),
        "knowledge_dir": None if knowledge is None else str(knowledge.directory),
        "num_cases": len(cases),
        "unknown_predictions": unknown,
        "sampling": None if sampling is None or generator is None else dataclasses.asdict(sampling),
        "prompt_style": (protocol if released_rules else prompt_style) if generator is not None else None,
        "paper_table1": {row: rows[f"{row} (paper)"] for row in paper_rows},
        **(context or {}),
    }
    report.write_metrics(out_dir / METRICS_FILE, metrics, **settings)
    report.write_jsonl(out_dir / CASES_FILE, [result.to_json() for result in results])
    report.plot_chart(out_dir / CHART_FILE, rows, columns, title=f"KVG-Bench Acc@0.5 (%), {protocol} protocol")
    return EvalOutcome(
        metrics=metrics,
        table=report.format_table({**rows, f"{name} mIoU": report.our_row(metrics, "mean_iou")}, columns),
        details=report.format_details(metrics),
        out_dir=out_dir,
        num_cases=len(cases),
        unknown_predictions=unknown,
        predictions_path=predictions_path,
        protocol=protocol,
    )


COMPARE_FILE = "compare.json"
COMPARE_CHART_FILE = "compare.png"


@dataclass
class CompareOutcome:
    """What a comparison produced."""

    comparison: Comparison
    out_dir: Path

    def format(self) -> str:
        return "\n".join([
            format_comparison(self.comparison),
            "",
            "an interval that excludes 0, or a McNemar p below 0.05, says the difference is unlikely to be noise",
            f"wrote {self.out_dir / COMPARE_FILE}, {self.out_dir / COMPARE_CHART_FILE}",
        ])


def _read_run_folder(folder: Path) -> tuple[str, list[dict[str, Any]]]:
    """The protocol (from ``metrics.json``) and the scored cases (``cases.jsonl``) of an ``eval --out`` folder."""
    import json

    from karl_verl.data.schema import DataError, iter_jsonl_objects

    metrics_path, cases_path = folder / METRICS_FILE, folder / CASES_FILE
    for path in (metrics_path, cases_path):
        if not path.is_file():
            raise DataError(str(folder), None, None, f"not an eval output folder: {path.name} is missing")
    try:
        protocol = json.loads(metrics_path.read_text(encoding="utf-8")).get("protocol", released.KARL_PROTOCOL)
    except (json.JSONDecodeError, AttributeError) as err:
        raise DataError(str(metrics_path), None, None, f"not a metrics file: {err}") from None
    records = []
    for line, record in iter_jsonl_objects(cases_path, str(cases_path)):
        for key, kind in (("question_id", str), ("category", str), ("correct", bool)):
            if not isinstance(record.get(key), kind):
                raise DataError(str(cases_path), line, key, f"expected a {kind.__name__}, got {record.get(key)!r}")
        records.append(record)
    return protocol, records


def load_run(
    path: str | Path,
    *,
    protocol: str | None = None,
    cases: Sequence[Any] | None = None,
    knowledge: KnowledgeTables | None = None,
    mastery: MasteryTable | None = None,
    seen_categories: Sequence[str] = SEEN_CATEGORIES,
    box_format: str = "qwen3_vl",
    abs_pixels: tuple[int, int] = QWEN25_PIXELS,
) -> RunCases:
    """One side of a comparison: an ``eval --out`` folder (its ``cases.jsonl``), or a predictions
    JSONL scored here on ``cases`` (the loaded benchmark) under ``protocol``.

    Knowledge levels come from the tables when given, else from the folder's recorded levels.
    """
    path = Path(path)
    seen = set(seen_categories)
    if path.is_dir():
        found, records = _read_run_folder(path)
        if protocol is not None and protocol != found:
            raise ValueError(f"{path} was scored with the {found!r} protocol, not {protocol!r}")
        entities = tuple(r.get("entity") for r in records)
        levels: tuple[int | None, ...] | None
        if knowledge is not None or mastery is not None:
            levels = tuple(_table_level(r, knowledge, mastery, seen) for r in records)
        elif any(r.get("knowledge_level") is not None for r in records):
            levels = tuple(r.get("knowledge_level") for r in records)
        else:
            levels = None
        return RunCases(label=path.name, protocol=found, question_ids=tuple(r["question_id"] for r in records),
                        categories=tuple(r["category"] for r in records),
                        correct=np.array([r["correct"] for r in records], dtype=bool), levels=levels,
                        entities=entities)
    if cases is None:
        raise ValueError(f"{path}: scoring a predictions file needs the benchmark (--bench)")
    protocol = protocol or released.KARL_PROTOCOL
    loaded = load_predictions(path, (case.question_id for case in cases))
    if protocol == released.RELEASED_PROTOCOL:
        check_released_predictions(cases, loaded.responses)
    results = score_cases(cases, loaded.responses, box_format=box_format, abs_pixels=abs_pixels, protocol=protocol,
                          knowledge=knowledge, mastery=mastery, seen_categories=seen_categories)
    has_levels = knowledge is not None or mastery is not None
    return RunCases(label=path.stem, protocol=protocol, question_ids=tuple(r.question_id for r in results),
                    categories=tuple(r.category for r in results),
                    correct=np.array([r.correct for r in results], dtype=bool),
                    levels=tuple(r.level for r in results) if has_levels else None,
                    entities=tuple(r.entity for r in results))


def _table_level(record: dict[str, Any], knowledge: KnowledgeTables | None, mastery: MasteryTable | None,
                 seen: set[str]) -> int | None:
    entity = record.get("entity")
    if not isinstance(entity, str):
        if knowledge is not None:
            raise ValueError(f"question_id {record['question_id']!r}: no entity recorded, so no knowledge level")
        return None
    if knowledge is not None:
        return knowledge.level_of(entity, record["category"] in seen, question_id=record["question_id"])[1]
    return mastery.level_of(entity)  # type: ignore[union-attr]


def run_compare(
    run_a: str | Path,
    run_b: str | Path,
    out_dir: str | Path,
    *,
    bench: str | Path | None = None,
    protocol: str | None = None,
    knowledge_dir: str | Path | KnowledgeTables | None = None,
    mastery: str | Path | MasteryTable | None = None,
    seen_categories: Sequence[str] = SEEN_CATEGORIES,
    unseen_categories: Sequence[str] = UNSEEN_CATEGORIES,
    box_format: str = "qwen3_vl",
    abs_pixels: tuple[int, int] = QWEN25_PIXELS,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
    progress: bool = True,
) -> CompareOutcome:
    """Compare two runs (``eval --out`` folders or predictions files) and write ``compare.json`` and
    ``compare.png`` to ``out_dir``; every input is read and checked before anything is written."""
    if protocol is not None and protocol not in released.PROTOCOLS:
        raise ValueError(f"protocol: expected one of {released.PROTOCOLS}, got {protocol!r}")
    if mastery is not None and knowledge_dir is not None:
        raise ValueError("give either a mastery table or a knowledge folder, not both")
    table = MasteryTable.load(mastery) if isinstance(mastery, (str, Path)) else mastery
    knowledge = KnowledgeTables.load(knowledge_dir) if isinstance(knowledge_dir, (str, Path)) else knowledge_dir
    paths = [Path(run_a), Path(run_b)]
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path}: no such run (expected an eval --out folder or a predictions JSONL)")
    if protocol is None:  # a folder knows how it was scored; predictions files follow it
        protocol = next((_read_run_folder(p)[0] for p in paths if p.is_dir()), released.KARL_PROTOCOL)
    cases = None
    if any(not path.is_dir() for path in paths):
        if bench is None:
            raise ValueError("scoring a predictions file needs the benchmark (--bench)")
        cases = load_bench(bench, progress=progress, protocol=protocol)
        if protocol == released.RELEASED_PROTOCOL:
            check_released_categories(cases, [*seen_categories, *unseen_categories])
    runs = [load_run(path, protocol=protocol, cases=cases, knowledge=knowledge, mastery=table,
                     seen_categories=seen_categories, box_format=box_format, abs_pixels=abs_pixels)
            for path in paths]
    if runs[0].label == runs[1].label:  # two folders named alike: tell them apart by their paths
        runs = [dataclasses.replace(run, label=str(path)) for run, path in zip(runs, paths, strict=True)]
    comparison = compare_runs(runs[0], runs[1], seen_categories, unseen_categories, resamples=resamples,
                              confidence=confidence, seed=seed)
    out_dir = Path(out_dir)
    write_comparison(out_dir / COMPARE_FILE, comparison, inputs=[str(p) for p in paths],
                     bench=None if bench is None else str(bench),
                     knowledge_dir=None if knowledge is None else str(knowledge.directory),
                     mastery=_source(mastery))
    plot_comparison(out_dir / COMPARE_CHART_FILE, comparison, labels=report.AXIS_LABELS)
    return CompareOutcome(comparison=comparison, out_dir=out_dir)
