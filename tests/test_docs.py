"""The README and docs/ stand alone, their links resolve, and every command's --help names its formats."""

import re
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
