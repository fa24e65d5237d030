"""The Table 1 text table, metrics.json and the chart."""

from __future__ import annotations

import json

import pytest

from karl_verl.evaluation.metrics import CaseResult, aggregate
from karl_verl.evaluation.paper import (
    CATEGORY_LABELS,
    DEFAULT_PAPER_ROWS,
    PAPER_TABLE1,
    SEEN_CATEGORIES,
    UNSEEN_CATEGORIES,
)
from karl_verl.evaluation.report import (
    comparison_rows,
    format_details,
    format_table,
    our_row,
    plot_chart,
    table_columns,
    write_metrics,
)


@pytest.fixture
def metrics():
    results = [CaseResult("1", "aircraft", "A", 0.8, True, True, False, (0, 0, 1, 1)),
               CaseResult("2", "aircraft", "B", 0.2, False, True, False, (0, 0, 1, 1)),
               CaseResult("3", "dog", "C", 0.0, False, False, True, None)]
    return aggregate(results, SEEN_CATEGORIES, UNSEEN_CATEGORIES)


def test_columns_follow_table_1():
    assert table_columns(SEEN_CATEGORIES, UNSEEN_CATEGORIES) == [
        "aircraft", "car", "reptilia", "bird", "food", "seen",
        "dog", "mollusca", "mammal", "flower", "landmark", "unseen", "overall"]


def test_table_has_paper_rows_beside_ours(metrics):
    rows = comparison_rows(metrics, "mine", DEFAULT_PAPER_ROWS)
    assert list(rows) == ["Qwen3-VL-8B (paper)", "KARL (paper)", "mine"]
    assert rows["mine"] == {"aircraft": 50.0, "dog": 0.0, "seen": 50.0, "unseen": 0.0,
                            "overall": pytest.approx(100 / 3)}
    text = format_table(rows, table_columns(SEEN_CATEGORIES, UNSEEN_CATEGORIES))
    header, rule, qwen, karl, mine = text.splitlines()
    labels = [CATEGORY_LABELS[c] for c in SEEN_CATEGORIES] + ["Seen"]
    labels += [CATEGORY_LABELS[c] for c in UNSEEN_CATEGORIES] + ["Unseen", "Overall"]
    assert [word for word in header.split() if word != "|"] == ["Model", *labels]
    assert qwen.split("|")[2].strip() == "56.94" and qwen.split("|")[1].split() == ["-"] * 5
    assert karl.split("|")[1].split() == ["71.05", "83.65", "70.34", "45.02", "87.86"]
    assert karl.split("|")[-1].strip() == "68.41"
    assert mine.split("|")[1].split() == ["50.00", "-", "-", "-", "-"] and mine.split("|")[-1].strip() == "33.33"
    assert set(rule) == {"-"}


def test_unknown_paper_row(metrics):
    with pytest.raises(ValueError, match="paper row"):
        comparison_rows(metrics, "mine", ["GPT-9"])


def test_mean_iou_row_and_details(metrics):
    assert our_row(metrics, "mean_iou")["aircraft"] == pytest.approx(50.0)
    details = format_details(metrics)
    assert "dog" in details and details.splitlines()[0].split() == [
        "group", "cases", "correct", "Acc@0.5", "mIoU", "unparsed", "missing"]


def test_metrics_json_and_chart(metrics, tmp_path):
    write_metrics(tmp_path / "metrics.json", metrics, name="mine")
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["format"] == "karl-verl/kvg-bench-metrics-v1" and data["name"] == "mine"
    assert data["overall"]["missing"] == 1 and data["categories"]["aircraft"]["acc"] == 0.5
    rows = comparison_rows(metrics, "mine", list(PAPER_TABLE1))
    plot_chart(tmp_path / "chart.png", rows, table_columns(SEEN_CATEGORIES, UNSEEN_CATEGORIES))
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png", "metrics.json"]  # no temporary files left


def test_paper_split_is_ten_disjoint_categories():
    assert len(set(SEEN_CATEGORIES) | set(UNSEEN_CATEGORIES)) == 10
    assert set(CATEGORY_LABELS) == set(SEEN_CATEGORIES) | set(UNSEEN_CATEGORIES)
    karl = PAPER_TABLE1["KARL"]
    # Case-weighted averages lie between the smallest and largest category figure.
    for split, key in ((SEEN_CATEGORIES, "seen"), (UNSEEN_CATEGORIES, "unseen")):
        assert min(karl[c] for c in split) <= karl[key] <= max(karl[c] for c in split)
