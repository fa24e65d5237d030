"""The released knowledge split: reading the four files and choosing each case's table."""

from __future__ import annotations

import json

import pytest

from karl_verl.evaluation.knowledge import KNOWLEDGE_FILES, TRAIN_ENTITIES_FILE, KnowledgeTables
from karl_verl.mastery import MasteryError


def test_table_choice_follows_the_released_rule(tmp_path, kvg):
    tables = KnowledgeTables.load(kvg.write_knowledge(
        tmp_path / "k", ["Su-30"], {"Su-30": "mostly correct"},
        {"Su-30": "completely incorrect", "MiG-29": "partially correct"},
        {"Husky": "mostly incorrect", "Su-30": "completely correct"}))
    assert tables.level_of("Su-30", seen=True) == ("train", 2)  # seen category, training entity
    assert tables.level_of("MiG-29", seen=True) == ("trainood", 3)  # seen category, not a training entity
    assert tables.level_of("Su-30", seen=False) == ("testood", 1)  # unseen category: the third table
    assert tables.level_of("Husky", seen=False) == ("testood", 4)


def test_an_entity_missing_from_its_table_is_named(tmp_path, kvg):
    tables = KnowledgeTables.load(kvg.write_knowledge(tmp_path / "k", ["Su-30"], {}, {}, {}))
    with pytest.raises(MasteryError, match=r"question_id 'q7': entity 'Su-30' is not in this table") as err:
        tables.level_of("Su-30", seen=True, question_id="q7")
    assert "results-visual_knowledge.json" in str(err.value)
    with pytest.raises(MasteryError, match=r"'Su-30 '"):  # looked up as written, not stripped
        tables.level_of("Su-30 ", seen=False)


def test_missing_files_and_bad_entries_are_named(tmp_path, kvg):
    with pytest.raises(MasteryError, match="knowledge folder not found"):
        KnowledgeTables.load(tmp_path / "none")
    folder = kvg.write_knowledge(tmp_path / "k", [], {}, {}, {})
    (folder / KNOWLEDGE_FILES[2]).unlink()
    with pytest.raises(MasteryError, match="results-visual_knowledge-trainood.json"):
        KnowledgeTables.load(folder)
    folder = kvg.write_knowledge(tmp_path / "k2", [], {"A": "Mostly Correct"}, {}, {})
    with pytest.raises(MasteryError, match=r"entity 'A': expected 'knowledge_category' to be one of"):
        KnowledgeTables.load(folder)
    (folder / TRAIN_ENTITIES_FILE).write_text(json.dumps(["A"]))
    with pytest.raises(MasteryError, match=r"item 0: expected \{\"entity_name\""):
        KnowledgeTables.load(folder)
