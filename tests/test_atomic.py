"""Atomic outputs (karl_verl/atomic.py): the previous file or the whole new one, nothing in between."""

import os
import stat

import pytest

from karl_verl.atomic import atomic_path, atomic_write_text


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "table.json"
    target.write_text("old", encoding="utf-8")
    atomic_write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new"
    assert os.listdir(tmp_path) == ["table.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "table.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("killed mid-write")
    assert target.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["table.json"]


def test_failure_removes_the_folders_it_made_and_only_those(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError), atomic_path(tmp_path / "out" / "a" / "b" / "rl.parquet"):
        raise ValueError("bad row")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_success_makes_missing_folders(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b" / "report.json", "{}")
    assert path.read_text(encoding="utf-8") == "{}"
