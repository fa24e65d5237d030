"""Presenting KVG-Bench results: the Table 1 text table, ``metrics.json`` and a bar chart.

Columns follow the paper's Table 1: the seen categories, their average, the unseen categories,
their average, overall. Paper rows (:mod:`karl_verl.evaluation.paper`) are printed beside ours;
cells the paper does not report show ``-``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from karl_verl.atomic import atomic_path, atomic_write_text
from karl_verl.evaluation.metrics import BenchMetrics, GroupMetrics
from karl_verl.evaluation.paper import CATEGORY_LABELS, OVERALL_KEY, PAPER_TABLE1, SEEN_KEY, UNSEEN_KEY

METRICS_FORMAT = "karl-verl/kvg-bench-metrics-v1"
AGGREGATE_LABELS = {SEEN_KEY: "Seen", UNSEEN_KEY: "Unseen", OVERALL_KEY: "Overall"}


def table_columns(seen: Sequence[str], unseen: Sequence[str], other: Sequence[str] = ()) -> list[str]:
    """Column keys in Table 1 order: seen categories, seen avg, unseen categories, unseen avg, others, overall."""
    return [*seen, SEEN_KEY, *unseen, UNSEEN_KEY, *other, OVERALL_KEY]


#: Axis labels of the charts: categories' short names and the aggregates'.
AXIS_LABELS = {**CATEGORY_LABELS, **AGGREGATE_LABELS}


def _label(key: str) -> str:
    return AGGREGATE_LABELS.get(key) or CATEGORY_LABELS.get(key) or key[:6].capitalize()


def our_row(metrics: BenchMetrics, attribute: str = "acc") -> dict[str, float]:
    """Our figures in percent by column key (``attribute``: ``acc`` or ``mean_iou``); empty groups left out."""
    groups: dict[str, GroupMetrics] = {**metrics.categories, SEEN_KEY: metrics.seen,
                                       UNSEEN_KEY: metrics.unseen, OVERALL_KEY: metrics.overall}
    row = {}
    for key, group in groups.items():
        value = getattr(group, attribute)
        if value is not None:
            row[key] = 100.0 * value
    return row


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
    """A fixed-width text table, one row per entry of ``rows`` (values in percent, 2 decimals)."""
    name_width = max(len("Model"), *(len(name) for name in rows))
    widths = [max(6, len(_label(key))) for key in columns]
    # Bars around each average column, as in the paper's table.
    aggregates = (SEEN_KEY, UNSEEN_KEY, OVERALL_KEY)
    separators = [" | " if i == 0 or key in aggregates or columns[i - 1] in aggregates else " "
                  for i, key in enumerate(columns)]

    def line(name: str, cells: Sequence[str]) -> str:
        body = "".join(sep + cell.rjust(width) for sep, cell, width in zip(separators, cells, widths, strict=True))
        return name.ljust(name_width) + body

    header = line("Model", [_label(key) for key in columns])
    out = [header, "-" * len(header)]
    for name, values in rows.items():
        out.append(line(name, [f"{values[key]:.2f}" if key in values else "-" for key in columns]))
    return "\n".join(out)


def format_details(metrics: BenchMetrics) -> str:
    """Per-group counts: cases, correct, Acc@0.5, mean IoU, unparseable and missing predictions."""
    groups: list[tuple[str, GroupMetrics]] = [
        *metrics.categories.items(),
        ("seen", metrics.seen), ("unseen", metrics.unseen), ("overall", metrics.overall),
    ]
    if metrics.knowledge is not None:
        groups += [("high knowledge (1-3)", metrics.knowledge["high"]),
                   ("low knowledge (4-5)", metrics.knowledge["low"])]
        groups += [(f"{domain} {band} knowledge", metrics.knowledge[f"{domain} {band}"])
                   for domain in ("seen", "unseen") for band in ("high", "low")]
        groups += [(f"level {level}", metrics.knowledge[str(level)]) for level in range(1, 6)]
    width = max(len(name) for name, _ in groups)
    header = f"{'cases':>6} {'correct':>7} {'Acc@0.5':>8} {'mIoU':>7} {'unparsed':>8} {'missing':>7}"
    lines = [f"{'group'.ljust(width)}  {header}"]
    for name, group in groups:
        acc = "-" if group.acc is None else f"{100 * group.acc:.2f}"
        miou = "-" if group.mean_iou is None else f"{100 * group.mean_iou:.2f}"
        lines.append(f"{name.ljust(width)}  {group.n:>6} {group.correct:>7} {acc:>8} {miou:>7} "
                     f"{group.unparseable:>8} {group.missing:>7}")
    if metrics.knowledge is not None and metrics.knowledge_arithmetic == "released":
        lines.append("high/low correct counts summed as the released evaluator does: int(Num * Acc) per table "
                     "and level (can drop a case)")
    if metrics.knowledge is not None and metrics.not_in_table:
        lines.append(f"{metrics.not_in_table} case(s) with an entity missing from the mastery table "
                     "(left out of the knowledge split)")
    return "\n".join(lines)


def comparison_rows(metrics: BenchMetrics, name: str, paper_rows: Sequence[str]) -> dict[str, dict[str, float]]:
    """Paper rows (labelled ``(paper)``), then ours: Acc@0.5 in percent by column key."""
    rows: dict[str, dict[str, float]] = {}
    for paper_name in paper_rows:
        if paper_name not in PAPER_TABLE1:
            raise ValueError(f"paper row: expected one of {list(PAPER_TABLE1)}, got {paper_name!r}")
        rows[f"{paper_name} (paper)"] = dict(PAPER_TABLE1[paper_name])
    rows[name] = our_row(metrics, "acc")
    return rows


def write_metrics(path: str | Path, metrics: BenchMetrics, **context: Any) -> Path:
    """``metrics.json``: every figure (fractions in [0, 1]) plus ``context`` (inputs, settings)."""
    data = {"format": METRICS_FORMAT, **context, **metrics.to_json()}
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def plot_chart(path: str | Path, rows: Mapping[str, Mapping[str, float]], columns: Sequence[str],
               title: str = "KVG-Bench Acc@0.5 (%)") -> Path:
    """Grouped bars, one group per column and one bar per row (missing values leave a gap); PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure with its own Agg canvas: no pyplot, no global backend state, no display needed.
    figure = Figure(figsize=(max(8.0, 0.9 * len(columns) + 2), 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bar_width = 0.8 / max(1, len(rows))
    for i, (name, values) in enumerate(rows.items()):
        heights = [values.get(key, math.nan) for key in columns]
        positions = [j + (i - (len(rows) - 1) / 2) * bar_width for j in range(len(columns))]
        axes.bar(positions, heights, width=bar_width, label=name)
    axes.set_xticks(range(len(columns)), [_label(key) for key in columns])
    axes.set_ylim(0, 100)
    axes.set_ylabel("Acc@0.5 (%)")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)
