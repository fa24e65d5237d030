"""``karl-verl eval`` end to end: read, (run the model,) score, and write the report files.

Files written to the output folder, each atomically:

* ``metrics.json``: every figure (fractions) plus inputs and settings;
* ``cases.jsonl``: one scored case per line (IoU, correct, parsed, missing, predicted box, level);
* ``kvg_bench.png``: bar chart of Acc@0.5 beside the paper's rows;
* ``predictions.jsonl``: only when a model was run, in the format ``--predictions`` reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
)
from karl_verl.evaluation.knowledge import KnowledgeTables
from karl_verl.evaluation.metrics import ACC_THRESHOLD, BenchMetrics
from karl_verl.evaluation.paper import DEFAULT_PAPER_ROWS, SEEN_CATEGORIES, UNSEEN_CATEGORIES
from karl_verl.mastery import MasteryTable

if TYPE_CHECKING:
    from karl_verl.backends.base import SamplingSettings, TextGenerator

METRICS_FILE = "metrics.json"
CASES_FILE = "cases.jsonl"
CHART_FILE = "kvg_bench.png"
PREDICTIONS_FILE = "predictions.jsonl"


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
        "mastery": None if mastery is None else str(mastery) if isinstance(mastery, (str, Path)) else "<table>",
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
