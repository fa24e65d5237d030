"""Mastery levels and the mastery table (karl_verl/mastery.py)."""

import json

import pytest

from karl_verl.mastery import (
    LEVEL_NAMES,
    MasteryEntry,
    MasteryError,
    MasteryTable,
    level_from_accuracy,
    parse_level,
)


class TestLevels:
    @pytest.mark.parametrize(
        ("accuracy", "level"),
        [(1.0, 1), (0.70, 1), (0.6999, 2), (0.45, 2), (0.4499, 3), (0.30, 3), (0.2999, 4), (0.10, 4), (0.0999, 5),
         (0.0, 5)],
    )
    def test_thresholds_are_inclusive_lower_bounds(self, accuracy, level):
        assert level_from_accuracy(accuracy) == level

    def test_parse_level(self):
        assert [parse_level(name) for name in LEVEL_NAMES] == [1, 2, 3, 4, 5]
        assert parse_level(" Mostly Correct ") == 2
        assert parse_level(3) == 3 and parse_level("4") == 4
        for bad in (0, 6, "expert", True, None, 2.5):
            with pytest.raises(MasteryError):
                parse_level(bad)

    def test_custom_thresholds_must_decrease(self):
        assert level_from_accuracy(0.5, (0.9, 0.6, 0.4, 0.2)) == 3
        with pytest.raises(MasteryError, match="decreasing"):
            level_from_accuracy(0.5, (0.1, 0.2, 0.3, 0.4))


class TestTable:
    def test_released_format(self, tmp_path):
        path = tmp_path / "results-visual_knowledge.json"
        path.write_text(json.dumps({
            "Sukhoi Su-30": {"knowledge_category": "mostly incorrect", "acc": 0.2},
            "Boeing 747": {"knowledge_category": "completely correct"},
        }))
        table = MasteryTable.load(path)
        assert table.level_of("Sukhoi Su-30") == 4 and table.level_of("Boeing 747") == 1
        assert table.level_of("Airbus A380") is None
        assert table.level_of("Airbus A380", default=5) == 5
        assert table.distribution()["completely correct"] == 1

    def test_rich_format_round_trip(self, tmp_path):
        table = MasteryTable.from_scores({"a": 0.8, "b": 0.2}, num_questions={"a": 50, "b": 40}, epoch=2,
                                         meta={"model": "tiny"})
        path = table.save(tmp_path / "sub" / "mastery.json")
        loaded = MasteryTable.load(path)
        assert loaded == table
        assert loaded.get("b") == MasteryEntry(level=4, score=0.2, num_questions=40, epoch=2)
        # Released tools can still read it: every entry carries knowledge_category.
        raw = json.loads(path.read_text())
        assert raw["entities"]["a"]["knowledge_category"] == "completely correct"

    def test_save_leaves_no_temporary_files(self, tmp_path):
        MasteryTable.from_scores({"a": 0.5}).save(tmp_path / "m.json")
        assert [p.name for p in tmp_path.iterdir()] == ["m.json"]

    def test_missing_file(self, tmp_path):
        with pytest.raises(MasteryError, match="m.json: mastery table not found"):
            MasteryTable.load(tmp_path / "m.json")

    def test_invalid_json_names_file_and_position(self, tmp_path):
        path = tmp_path / "m.json"
        path.write_text('{"a": {"knowledge_category": "mostly correct"},,}')
        with pytest.raises(MasteryError, match=r"m.json: invalid JSON at line 1"):
            MasteryTable.load(path)

    def test_unknown_level_names_file_entity_and_expected(self, tmp_path):
        path = tmp_path / "m.json"
        path.write_text('{"Sukhoi Su-30": {"knowledge_category": "sort of"}}')
        with pytest.raises(MasteryError) as err:
            MasteryTable.load(path)
        message = str(err.value)
        assert "m.json" in message and "Sukhoi Su-30" in message and "completely correct" in message

    def test_entry_without_level(self, tmp_path):
        path = tmp_path / "m.json"
        path.write_text('{"x": {"acc": 0.3}}')
        with pytest.raises(MasteryError, match="'x': missing 'knowledge_category'"):
            MasteryTable.load(path)

    def test_not_an_object(self, tmp_path):
        path = tmp_path / "m.json"
        path.write_text("[1, 2]")
        with pytest.raises(MasteryError, match="expected a JSON object"):
            MasteryTable.load(path)
