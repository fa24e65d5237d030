"""``karl-verl probe`` end to end on a tiny checkpoint and a Pillow-made probe set (CPU)."""

from __future__ import annotations

import json

import pytest

from karl_verl.cli import main
from karl_verl.mastery import LEVEL_NAMES, MasteryTable
from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("mode", ["logprob", "generate"])
def test_probe_command_end_to_end(tmp_path, probe_parquet, tiny_checkpoint, capsys, mode):
    out = tmp_path / "tables" / "mastery.json"
    argv = ["probe", "--model", str(tiny_checkpoint), "--data", str(probe_parquet), "--out", str(out),
            "--mode", mode, "--per-entity", "2", "--batch-size", "4", "--device", "cpu", "--epoch", "1",
            "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    table = MasteryTable.load(out)
    assert len(table) == 9 and all(entry.num_questions == 2 and entry.epoch == 1 for entry in table.entries.values())
    raw = json.loads(out.read_text())
    assert raw["meta"]["mode"] == mode and raw["meta"]["model"] == str(tiny_checkpoint)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert all(name in printed for name in LEVEL_NAMES) and "18 questions, 9 entities" in printed
    assert ("unparseable replies" in printed) == (mode == "generate")
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_probe_command_reports_bad_data_without_loading_a_model(tmp_path, capsys):
    data = tmp_path / "probe.jsonl"
    data.write_text('{"entity": "a", "category": "c"}\n')
    out = tmp_path / "mastery.json"
    assert main(["probe", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("karl-verl probe: error:") and "row 1, field 'image'" in err
    assert not out.exists()


def test_probe_command_small_category(tmp_path, probe_kit, tiny_checkpoint, capsys):
    rows = probe_kit.rows({"car": ["a", "b", "c"], "dog": ["d", "e"]}, images_per_entity=1)
    data = probe_kit.write_parquet(tmp_path / "p.parquet", rows)
    out = tmp_path / "m.json"
    base = ["probe", "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "'car' has 3" in err and "pass --on-small-category global" in err and "on_small_category=" not in err
    assert main(base + ["--on-small-category", "global", "--device", "cpu"]) == 0
    assert len(MasteryTable.load(out)) == 5


def test_probe_command_warns_about_entities_with_few_questions(tmp_path, probe_parquet, tiny_checkpoint, capsys):
    out = tmp_path / "mastery.json"
    argv = ["probe", "--model", str(tiny_checkpoint), "--data", str(probe_parquet), "--out", str(out),
            "--per-entity", "2", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if line.startswith("karl-verl probe: warning:")]
    assert "9 entities have fewer than 10 questions" in warning and "and 4 more" in warning
    assert "raise --per-entity (now 2)" in warning


def test_thin_entity_message_lists_five_and_says_what_to_do():
    from karl_verl.commands.probe import format_thin_entities

    message = format_thin_entities({"a": 2, "b": 3}, per_entity=50)
    assert message.startswith("2 entities have fewer than 10 questions") and "a (2), b (3)" in message
    assert "add images of them to the probe set" in message


def test_histogram_labels_the_five_level_bands():
    from karl_verl.commands.probe import level_bands
    from karl_verl.config import MasteryConfig

    bands = level_bands(MasteryConfig().thresholds)
    assert [(low, high) for low, high, _ in bands] == [(0.7, 1.0), (0.45, 0.7), (0.3, 0.45), (0.1, 0.3), (0.0, 0.1)]
    assert [label for *_, label in bands] == [f"{i} {name}" for i, name in enumerate(LEVEL_NAMES, start=1)]
