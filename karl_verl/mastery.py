"""Knowledge mastery: the five levels, the ACC -> level thresholds, and the mastery table on disk.

Pure module: no Ray, no verl. This is the one place where level names, their order and the
accuracy thresholds of KARL (arXiv 2503.12797, Sec. 3.1; see docs/METHOD.md section 1) live.

Levels are numbered 1..5 from the highest mastery ("completely correct") to the lowest
("completely incorrect"); every per-level table in the package (reward scales, advantage
weights) is indexed in that order.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from karl_verl.atomic import atomic_write_text

#: Level names as they appear in the released JSON files (``knowledge_category``), level 1 first.
LEVEL_NAMES: tuple[str, ...] = (
    "completely correct",
    "mostly correct",
    "partially correct",
    "mostly incorrect",
    "completely incorrect",
)
NUM_LEVELS = len(LEVEL_NAMES)

#: Lower bounds of ACC_avg for levels 1..4; anything below the last bound is level 5.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.70, 0.45, 0.30, 0.10)

#: The level the paper's released code gives an entity missing from the table.
DEFAULT_LEVEL_NAME = "completely incorrect"

#: Levels 1-3 are "high knowledge", 4-5 "low knowledge" in the paper's Fig. 4 analysis.
HIGH_KNOWLEDGE_LEVELS: frozenset[int] = frozenset({1, 2, 3})

TABLE_FORMAT = "karl-verl/mastery-v1"


class MasteryError(ValueError):
    """A mastery table or level could not be read; the message names the file and entity."""


def parse_level(value: Any, *, where: str = "knowledge level") -> int:
    """Return the level number 1..5 for a level name, an integer 1..5, or a digit string.

    >>> parse_level("mostly correct"), parse_level(4), parse_level("5")
    (2, 4, 5)
    """
    if isinstance(value, bool):
        raise MasteryError(f"{where}: expected a level name {list(LEVEL_NAMES)} or an integer 1..5, got {value!r}")
    if isinstance(value, int):
        # Compared as an int: float(value) overflows on integers beyond float range (10**400).
        if 1 <= value <= NUM_LEVELS:
            return value
    elif isinstance(value, float):
        if value.is_integer() and 1 <= value <= NUM_LEVELS:
            return int(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in LEVEL_NAMES:
            return LEVEL_NAMES.index(text) + 1
        if text.isdigit() and 1 <= int(text) <= NUM_LEVELS:
            return int(text)
    elif hasattr(value, "item"):  # numpy / torch scalars travel through DataProto
        return parse_level(value.item(), where=where)
    raise MasteryError(f"{where}: expected a level name {list(LEVEL_NAMES)} or an integer 1..5, got {value!r}")


def level_name(level: int) -> str:
    """The released name of level 1..5."""
    return LEVEL_NAMES[parse_level(level) - 1]


def level_from_accuracy(accuracy: float, thresholds: Iterable[float] = DEFAULT_THRESHOLDS) -> int:
    """Map a probe accuracy ACC_avg in [0, 1] to a level 1..5 (lower bounds are inclusive).

    >>> [level_from_accuracy(a) for a in (0.7, 0.69, 0.45, 0.3, 0.1, 0.09)]
    [1, 2, 2, 3, 4, 5]
    """
    bounds = tuple(float(t) for t in thresholds)
    if len(bounds) != NUM_LEVELS - 1 or any(a <= b for a, b in itertools.pairwise(bounds)):
        raise MasteryError(f"thresholds: expected {NUM_LEVELS - 1} strictly decreasing bounds, got {bounds}")
    if not _is_finite_number(accuracy):
        raise MasteryError(f"accuracy: expected a finite number in [0, 1], got {accuracy!r}")
    for level, bound in enumerate(bounds, start=1):
        if accuracy >= bound:
            return level
    return NUM_LEVELS


@dataclass(frozen=True)
class MasteryEntry:
    """What is known about one entity: its level and, when measured by us, how."""

    level: int
    score: float | None = None
    num_questions: int | None = None
    epoch: int | None = None

    @property
    def name(self) -> str:
        return LEVEL_NAMES[self.level - 1]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"knowledge_category": self.name, "level": self.level}
        for key in ("score", "num_questions", "epoch"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class MasteryTable:
    """Entity -> mastery level, loaded from the released JSON format or our richer format.

    Released format: ``{"<entity>": {"knowledge_category": "<level name>", ...}, ...}``.
    Our format: ``{"format": "karl-verl/mastery-v1", "entities": {"<entity>": {"level": 3,
    "knowledge_category": "partially correct", "score": 0.4, "num_questions": 50, "epoch": 1}},
    "meta": {...}}``; the ``knowledge_category`` key is kept so released tools can read it.
    """

    entries: dict[str, MasteryEntry] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Lookups strip the entity name, and so does loading; keys kept unstripped here would be
        # unreachable, and would not survive a save and load (" Su-30" comes back as "Su-30").
        if any(entity != entity.strip() for entity in self.entries):
            self.entries = {entity.strip(): entry for entity, entry in self.entries.items()}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, entity: object) -> bool:
        return isinstance(entity, str) and entity.strip() in self.entries

    def get(self, entity: str) -> MasteryEntry | None:
        return self.entries.get(entity.strip())

    def level_of(self, entity: str, default: int | None = None) -> int | None:
        """The entity's level, or ``default`` when the entity is not in the table."""
        entry = self.get(entity)
        return default if entry is None else entry.level

    def distribution(self) -> dict[str, int]:
        """Entity count per level name, in level order (levels with no entity included)."""
        counts = Counter(entry.level for entry in self.entries.values())
        return {name: counts.get(i + 1, 0) for i, name in enumerate(LEVEL_NAMES)}

    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, float],
        *,
        thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
        num_questions: Mapping[str, int] | None = None,
        epoch: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> MasteryTable:
        """Build a table from probe accuracies (entity -> ACC_avg)."""
        thresholds = tuple(thresholds)
        entries = {
            entity: MasteryEntry(
                level=level_from_accuracy(score, thresholds),
                score=float(score),
                num_questions=None if num_questions is None else int(num_questions[entity]),
                epoch=epoch,
            )
            for entity, score in scores.items()
        }
        return cls(entries=entries, meta=dict(meta or {}))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "entities": {entity: entry.to_json() for entity, entry in sorted(self.entries.items())},
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "<memory>") -> MasteryTable:
        """Parse either format; errors name ``source``, the entity and what was expected."""
        if not isinstance(data, dict):
            raise MasteryError(f"{source}: expected a JSON object mapping entity -> entry, got {type(data).__name__}")
        if data.get("format") == TABLE_FORMAT:
            raw_entries = data.get("entities")
            meta = data.get("meta") or {}
            if not isinstance(raw_entries, dict):
                raise MasteryError(f"{source}: key 'entities' must be an object mapping entity -> entry")
            if not isinstance(meta, dict):
                raise MasteryError(f"{source}: key 'meta' must be an object")
        else:
            raw_entries, meta = data, {}
        entries: dict[str, MasteryEntry] = {}
        for entity, raw in raw_entries.items():
            where = f"{source}: entity {entity!r}"
            if not isinstance(raw, dict):
                raise MasteryError(f"{where}: expected an object with 'knowledge_category' or 'level', got {raw!r}")
            if "level" in raw:
                level = parse_level(raw["level"], where=f"{where}, key 'level'")
            elif "knowledge_category" in raw:
                level = parse_level(raw["knowledge_category"], where=f"{where}, key 'knowledge_category'")
            else:
                raise MasteryError(f"{where}: missing 'knowledge_category' (one of {list(LEVEL_NAMES)}) or 'level'")
            score = raw.get("score")
            if score is not None and not _is_finite_number(score):
                raise MasteryError(f"{where}, key 'score': expected a finite number, got {score!r}")
            entries[entity.strip()] = MasteryEntry(
                level=level,
                score=None if score is None else float(score),
                num_questions=_optional_int(raw.get("num_questions"), f"{where}, key 'num_questions'"),
                epoch=_optional_int(raw.get("epoch"), f"{where}, key 'epoch'"),
            )
        return cls(entries=entries, meta=dict(meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MasteryTable:
        return cls.from_json(read_json_file(path, "mastery table"), source=str(path))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: readers see the old file or the new one, never a partial one."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")


def read_json_file(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file (data only: nothing is evaluated); errors name the file and position."""
    path = Path(path)
    if not path.is_file():
        raise MasteryError(f"{path}: {what} not found (expected a JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MasteryError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise MasteryError(f"{path}: not UTF-8 text ({err})") from None
    except RecursionError:
        # json.loads recurses per nesting level: "[[[[..." of a damaged or crafted file.
        raise MasteryError(f"{path}: invalid JSON: nested too deeply") from None


def _is_finite_number(value: Any) -> bool:
    """A finite int or float; False (not OverflowError) for an integer beyond float range."""
    if not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _optional_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MasteryError(f"{where}: expected an integer, got {value!r}")
    return value
