"""The released knowledge split of KVG-Bench (``--knowledge-dir``): which mastery table a case uses.

The split ships as four files in one folder:

* ``all_entities_train.json``: a list of ``{"entity_name": ...}``, the training entities;
* ``results-visual_knowledge.json``: levels of the training entities;
* ``results-visual_knowledge-trainood.json``: levels of seen-category entities not in training;
* ``results-visual_knowledge-testood.json``: levels of the unseen-category entities.

The three tables map an entity to ``{"knowledge_category": "<level name>", ...}``. A case of a
seen category uses the first table when its entity is a training entity, else the second; any
other case uses the third. Entities are looked up exactly as written in the benchmark's answer.
An entity missing from the table its case uses is an error that names it.

Pure module: JSON files only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karl_verl.mastery import LEVEL_NAMES, MasteryError, read_json_file

TRAIN_ENTITIES_FILE = "all_entities_train.json"
#: Table key -> file name, in the order a case's table is chosen.
TABLE_FILES: Mapping[str, str] = {
    "train": "results-visual_knowledge.json",
    "trainood": "results-visual_knowledge-trainood.json",
    "testood": "results-visual_knowledge-testood.json",
}
KNOWLEDGE_FILES: tuple[str, ...] = (TRAIN_ENTITIES_FILE, *TABLE_FILES.values())


@dataclass(frozen=True)
class KnowledgeTables:
    """The training entities and the three level tables (entity -> level 1..5)."""

    train_entities: frozenset[str]
    tables: Mapping[str, Mapping[str, int]]
    directory: Path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> KnowledgeTables:
        """Read the four files; errors name the file, the entry and what was expected."""
        directory = Path(directory)
        if not directory.is_dir():
            raise MasteryError(f"{directory}: knowledge folder not found (expected the files {list(KNOWLEDGE_FILES)})")
        missing = [name for name in KNOWLEDGE_FILES if not (directory / name).is_file()]
        if missing:
            raise MasteryError(f"{directory}: missing {missing} (a knowledge folder holds {list(KNOWLEDGE_FILES)})")
        entities_path = directory / TRAIN_ENTITIES_FILE
        return cls(
            train_entities=_train_entities(read_json_file(entities_path, "training-entity list"), entities_path),
            tables={key: _levels(read_json_file(directory / name, "knowledge table"), directory / name)
                    for key, name in TABLE_FILES.items()},
            directory=directory,
        )

    def table_for(self, entity: str, seen: bool) -> str:
        """The key of the table a case uses: ``train``, ``trainood`` (seen categories) or ``testood``."""
        if not seen:
            return "testood"
        return "train" if entity in self.train_entities else "trainood"

    def level_of(self, entity: str, seen: bool, *, question_id: str | None = None) -> tuple[str, int]:
        """The case's table key and its entity's level; :class:`MasteryError` naming the entity when absent."""
        key = self.table_for(entity, seen)
        level = self.tables[key].get(entity)
        if level is None:
            case = "" if question_id is None else f"question_id {question_id!r}: "
            raise MasteryError(f"{self.directory / TABLE_FILES[key]}: {case}entity {entity!r} is not in this table "
                               f"({'seen' if seen else 'unseen'} category"
                               f"{', training entity' if key == 'train' else ''})")
        return key, level


def _train_entities(data: Any, path: Path) -> frozenset[str]:
    if not isinstance(data, list):
        raise MasteryError(f"{path}: expected a JSON list of {{\"entity_name\": ...}}, got {type(data).__name__}")
    names = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("entity_name"), str):
            raise MasteryError(f"{path}: item {index}: expected {{\"entity_name\": \"...\"}}, got {item!r:.200}")
        names.append(item["entity_name"])
    return frozenset(names)


def _levels(data: Any, path: Path) -> dict[str, int]:
    if not isinstance(data, dict):
        raise MasteryError(f"{path}: expected a JSON object mapping entity -> entry, got {type(data).__name__}")
    levels = {}
    for entity, entry in data.items():
        name = entry.get("knowledge_category") if isinstance(entry, dict) else None
        if name not in LEVEL_NAMES:
            raise MasteryError(f"{path}: entity {entity!r}: expected 'knowledge_category' to be one of "
                               f"{list(LEVEL_NAMES)}, got {entry!r:.200}")
        levels[entity] = LEVEL_NAMES.index(name) + 1
    return levels
