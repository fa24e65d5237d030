"""The README and docs/ stand alone, their links resolve, and every command's --help names its formats."""

import re
import sys
from pathlib import Path

import pytest

from karl_verl.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OUTSIDE = ("KARL_METHOD", "VERL_INTEGRATION", "STYLE.md", "../shared", "/work/")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_reference_outside_the_repository(doc):
    text = doc.read_text()
    assert [word for word in OUTSIDE if word in text] == []
    assert "<this repository>" not in text and "git+<" not in text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)#:]*)(#[^)]*)?\)", doc.read_text()):
        path, anchor = target
        linked = (doc.parent / path) if path else doc
        assert linked.exists(), f"{doc.name}: link to {path}"
        if anchor and linked.suffix == ".md":
            assert anchor[1:] in anchors(linked), f"{doc.name}: no heading {anchor} in {linked.name}"


def test_data_formats_describes_every_file_a_command_reads_or_writes():
    headings = anchors(REPO / "docs" / "DATA_FORMATS.md")
    for name in ("annotations", "single-entity-set", "rl-parquet", "probe-set", "responses", "benchmark-parquet",
                 "predictions", "mastery-table", "mastery-state", "metricsjson-and-casesjsonl"):
        assert name in headings


def test_method_has_the_four_thresholds_and_the_scale_tables():
    from karl_verl.config import REWARD_PRESETS, MasteryConfig

    text = (REPO / "docs" / "METHOD.md").read_text()
    for bound in MasteryConfig().thresholds:
        assert f"{bound:.2f}" in text
    for table in {table for tables in REWARD_PRESETS.values() for table in tables} - {(1.0,) * 5, (0.0,) * 5}:
        assert ", ".join(map(str, table)) in text, table


def _subparsers(parser):
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return actions[0].choices if actions else {}


@pytest.mark.parametrize("command", ["data convert", "data compose", "data filter", "probe", "eval"])
def test_help_names_the_format_file(command):
    parser = build_parser()
    for word in command.split():
        parser = _subparsers(parser)[word]
    assert "docs/DATA_FORMATS.md" in parser.format_help()


def _run_all():
    import importlib.util

    spec = importlib.util.spec_from_file_location("karl_benchmarks_run_all", REPO / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_table_is_the_one_run_all_writes():
    """Same rows, labels and targets as benchmarks/run_all.py's ROWS (the figures are whatever its last
    --readme run measured), every target met, and a note saying when and how it was measured."""
    run_all = _run_all()
    readme = (REPO / "docs" / "BENCHMARKS.md").read_text()
    assert readme.count(run_all.README_START) == 1 and readme.count(run_all.README_END) == 1
    section = readme.split(run_all.README_START)[1].split(run_all.README_END)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| benchmark |")]
    assert [(label, target) for label, _figure, target, _met in rows] == [(r.label, r.target) for r in run_all.ROWS]
    assert all(met == ("" if r.met is None else "yes") for (*_, met), r in zip(rows, run_all.ROWS, strict=True))
    assert "Measured by `python benchmarks/run_all.py" in section


def test_run_all_writes_the_table_between_the_markers_and_keeps_the_rest(tmp_path):
    run_all = _run_all()
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{run_all.README_START}\nold table\n{run_all.README_END}\n\nafter\n")
    figures = {row.key: 1.0 for row in run_all.ROWS}
    del figures["eval_compare_s"]
    rows = run_all.table(figures)
    assert ("eval --compare, 1,336 cases x 10,000 resamples", "not measured", "< 5 s", "") in rows
    run_all.write_readme(readme, run_all.markdown(rows, "note"))
    text = readme.read_text()
    assert text.startswith("# title\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    assert "| karl_grpo max abs difference from verl GRPO | 1 | <= 1e-6 | NO |" in text
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no benchmarks table markers"):
        run_all.write_readme(unmarked, "table")
    assert unmarked.read_text() == "no markers\n"
