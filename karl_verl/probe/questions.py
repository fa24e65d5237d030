"""The probe set and the 4-choice recognition questions built from it (docs/METHOD.md section 2).

Pure module (no torch, no verl, no Ray; pyarrow only to read parquet): runs anywhere, CPU.

A probe set is a parquet or JSONL file with one row per (image, entity):

============== ======== =================================================================
column         required meaning
============== ======== =================================================================
entity         yes      the fine-grained entity shown (e.g. ``Sukhoi Su-30``)
category       yes      its super-category (e.g. ``aircraft``); distractors come from it
image          yes      a path (relative paths are relative to the probe file), encoded
                        bytes, or ``{"bytes": ..., "path": ...}`` (parquet struct; in JSONL
                        ``bytes`` is base64 text)
image_id       no       a stable name of the image (default: ``row<N>``)
entities_in_image no    for composite images: every entity in the image; the others are
                        the first distractors
============== ======== =================================================================

The probe set written by ``karl-verl data compose`` is read as is: its ``source_id`` column serves
as ``image_id`` and its ``co_entities`` (entities shown beside this one in the training
composites) as ``entities_in_image``; other columns are ignored.

Questions follow the paper's benchmark-side variant: up to ``per_entity`` images per entity;
exactly three distractors, first other entities in the same image, then entities of the same
category; answer letters balanced over A-D (per entity and overall) and shuffled; everything
deterministic for a seed.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import random
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Option letters, in order.
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
NUM_OPTIONS = len(LETTERS)

#: The question: ``{category}`` and the formatted ``{options}`` (one ``OPTION_TEMPLATE`` per line).
PROMPT_TEMPLATE = "<image>What is the {category} in the image?\n{options}\nAnswer with the letter only."
OPTION_TEMPLATE = "{letter}. {option}"

#: Optional field -> the columns it is read from, first present wins (``karl-verl data compose`` names).
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "image_id": ("image_id", "source_id"),
    "entities_in_image": ("entities_in_image", "co_entities"),
}

#: What ``build_questions`` does with a category of fewer than 4 entities.
SMALL_CATEGORY_POLICIES = ("error", "global")


class ProbeError(ValueError):
    """The probe set or a probe run is unusable; the message names the file, row, field or entity."""


class SmallCategoryError(ProbeError):
    """Categories with fewer than 4 entities, under ``on_small_category="error"``.

    ``categories`` maps each to its entities; :meth:`explain` words the way out for the caller
    (a Python argument, a command-line flag).
    """

    def __init__(self, categories: Mapping[str, list[str]], way_out: str = "on_small_category='global'") -> None:
        self.categories = dict(categories)
        super().__init__(self.explain(way_out))

    def explain(self, way_out: str) -> str:
        listing = "; ".join(f"{c!r} has {len(n)}: {n}" for c, n in self.categories.items())
        return (f"categories with fewer than {NUM_OPTIONS} entities cannot give {NUM_OPTIONS - 1} same-category "
                f"distractors: {listing}. Add entities, or pass {way_out} to draw the missing distractors from "
                "other categories.")


#: Fewer questions than this give an entity a level that is mostly noise (2 answers: ACC 0, 0.5 or 1).
MIN_QUESTIONS_PER_ENTITY = 10


def thin_entities(questions: Iterable[ProbeQuestion], minimum: int = MIN_QUESTIONS_PER_ENTITY) -> dict[str, int]:
    """Entities with fewer than ``minimum`` questions -> their question count, fewest first."""
    counts: dict[str, int] = defaultdict(int)
    for question in questions:
        counts[question.entity] += 1
    return dict(sorted(((e, n) for e, n in counts.items() if n < minimum), key=lambda item: (item[1], item[0])))


@dataclass(frozen=True)
class ProbeItem:
    """One row of a probe set: an image showing ``entity`` (of ``category``)."""

    entity: str
    category: str
    image: Any
    image_id: str
    entities_in_image: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProbeQuestion:
    """One 4-choice question; ``options[LETTERS.index(answer_letter)] == entity``."""

    question_id: str
    entity: str
    category: str
    image: Any
    prompt: str
    options: tuple[str, ...]
    answer_letter: str


def format_prompt(category: str, options: Sequence[str]) -> str:
    """The question text for ``options`` (in letter order), with its ``<image>`` placeholder.

    >>> print(format_prompt("aircraft", ["Su-30", "F-16", "MiG-29", "J-10"]))
    <image>What is the aircraft in the image?
    A. Su-30
    B. F-16
    C. MiG-29
    D. J-10
    Answer with the letter only.
    """
    if len(options) != NUM_OPTIONS:
        raise ProbeError(f"a question needs exactly {NUM_OPTIONS} options, got {len(options)}: {list(options)}")
    lines = "\n".join(OPTION_TEMPLATE.format(letter=letter, option=option) for letter, option in zip(
        LETTERS, options, strict=True))
    return PROMPT_TEMPLATE.format(category=category, options=lines)


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class ParquetImage:
    """The image of one row of a parquet probe set, read only when a question is asked.

    The in-training probe keeps these instead of the encoded images, so the TaskRunner's memory does
    not grow with the probe set; a row whose image cannot be read fails the refresh then, naming
    the file and the row (rows count from 1, as everywhere in karl-verl's messages).
    """

    path: str
    #: 0-based row in the file.
    index: int
    column: str = "image"

    @property
    def where(self) -> str:
        return f"{self.path}: row {self.index + 1}, field {self.column!r}"

    def read(self) -> bytes | str:
        """The row's encoded image bytes, or an absolute image path."""
        group, within = _row_group_of(self.path, self.index)
        # One reader at a time: the probe's prepare threads reach a new row group together, and each
        # would otherwise decode its own copy of it (8 threads x a 48 MB group were most of a refresh's
        # peak memory, and made it grow with the probe set).
        with _ROW_GROUP_READ:
            rows = _parquet_row_group(self.path, os.stat(self.path).st_mtime_ns, group, self.column)
        value = rows[within].as_py()
        try:
            return _image_field(value, self.where.rsplit(", field", 1)[0], Path(self.path).parent)
        except ProbeError:
            raise
        except Exception as err:  # a malformed cell: whatever it is, it is not an image
            raise ProbeError(f"{self.where}: not a readable image ({type(err).__name__}: {err})") from None


@functools.lru_cache(maxsize=64)
def _row_group_starts(path: str, mtime_ns: int) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    starts, total = [], 0
    for group in range(metadata.num_row_groups):
        starts.append(total)
        total += metadata.row_group(group).num_rows
    starts.append(total)
    return tuple(starts)


def _row_group_of(path: str, index: int) -> tuple[int, int]:
    """(row group, row within it) of the file's 0-based row ``index``."""
    import bisect

    starts = _row_group_starts(path, os.stat(path).st_mtime_ns)
    group = bisect.bisect_right(starts, index) - 1
    if not 0 <= index < starts[-1]:
        raise ProbeError(f"{path}: row {index + 1} does not exist (the file has {starts[-1]} rows)")
    return group, index - starts[group]


_ROW_GROUP_READ = threading.Lock()

# Two row groups at most are held decoded (per process): questions are asked in file order, so each
# group is read once per refresh.
@functools.lru_cache(maxsize=2)
def _parquet_row_group(path: str, mtime_ns: int, group: int, column: str) -> Any:
    import pyarrow.parquet as pq

    # Kept as Arrow's column, each value turned into Python only when its question is asked: one copy
    # of the group's images in memory, not Arrow's and a list of bytes.
    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)


def load_probe_set(path: str | os.PathLike[str], *, lazy: bool = False) -> list[ProbeItem]:
    """Read a probe set from ``.parquet`` or ``.jsonl`` / ``.json`` (one JSON object per line).

    ``lazy`` (parquet only): keep a :class:`ParquetImage` per row instead of the image, which is read
    (and checked) when its question is asked; without it every image is decoded and checked now.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: probe set not found (expected a .parquet or .jsonl file)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            if lazy:
                columns = [name for name in pq.read_schema(path).names if name != "image"]
                records = pq.read_table(path, columns=columns).to_pylist()
                source = str(path.resolve())
                for index, record in enumerate(records):
                    record["image"] = ParquetImage(source, index)
            else:
                records = pq.read_table(path).to_pylist()
        except ProbeError:
            raise
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise ProbeError(f"{path}: cannot read parquet ({type(err).__name__}: {err})") from None
    elif suffix in (".jsonl", ".json"):
        records = _read_jsonl(path)
    else:
        raise ProbeError(f"{path}: unknown probe set format {suffix!r}; expected .parquet or .jsonl")
    return probe_items_from_records(records, source=str(path), base_dir=path.parent)


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ProbeError(f"{path}: line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
    return records


def probe_items_from_records(
    records: Iterable[Mapping[str, Any]], *, source: str = "<memory>", base_dir: str | os.PathLike[str] | None = None
) -> list[ProbeItem]:
    """Validate rows (dicts) into :class:`ProbeItem`; errors name ``source``, the row and the field.

    Relative image paths are resolved against ``base_dir`` (the probe file's folder when loading).
    """
    items = []
    # Rows count from 1, as in the data toolkit's messages.
    for row, record in enumerate(records, start=1):
        where = f"{source}: row {row}"
        if not isinstance(record, Mapping):
            raise ProbeError(f"{where}: expected an object with entity/category/image, got {type(record).__name__}")
        entity = _required_text(record, "entity", where)
        category = _required_text(record, "category", where)
        image = _image_field(record.get("image"), where, base_dir)
        id_key, image_id = _optional_field(record, "image_id")
        if image_id is None:
            image_id = f"row{row}"
        elif not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or str(image_id).strip() == "":
            raise ProbeError(f"{where}, field {id_key!r}: expected a non-empty string, got {image_id!r}")
        others_key, others = _optional_field(record, "entities_in_image")
        if others is None:
            others = ()
        elif isinstance(others, (str, bytes, Mapping)) or not all(isinstance(e, str) and e.strip() for e in others):
            raise ProbeError(f"{where}, field {others_key!r}: expected a list of entity names, got {others!r}")
        items.append(ProbeItem(entity, category, image, str(image_id).strip(), tuple(e.strip() for e in others)))
    if not items:
        raise ProbeError(f"{source}: the probe set has no rows")
    return items


def _optional_field(record: Mapping[str, Any], name: str) -> tuple[str, Any]:
    """(column used, value) of an optional field, trying its aliases in order."""
    for key in FIELD_ALIASES[name]:
        if record.get(key) is not None:
            return key, record[key]
    return name, None


def _required_text(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ProbeError(f"{where}, field {key!r}: expected a non-empty string, got {value!r}")
    return value.strip()


def _decodable(image: bytes | Path, where: str) -> Any:
    """Decode the image fully now, so a corrupt one is refused at load with its row, not mid-probe."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            opened.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data; all mean "not an image"
        raise ProbeError(f"{where}: not a readable image ({type(err).__name__}: {err})") from None
    return image


def _image_field(value: Any, where: str, base_dir: str | os.PathLike[str] | None) -> Any:
    """Check an image field and normalise it: bytes stay bytes, paths become absolute existing files."""
    if isinstance(value, ParquetImage):
        return value  # read and checked when its question is asked
    where = f"{where}, field 'image'"
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise ProbeError(f"{where}: empty bytes")
        return _decodable(bytes(value), where)
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):  # JSON cannot hold bytes: base64 text
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ProbeError(f"{where}: 'bytes' is text but not valid base64") from None
        if isinstance(data, (bytes, bytearray)) and data:
            return _decodable(bytes(data), where)
        if path:
            return _image_field(path, where.rsplit(", field", 1)[0], base_dir)
        raise ProbeError(f"{where}: expected non-empty 'bytes' or a 'path', got keys {sorted(value)}")
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        path = Path(os.fspath(value))
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise ProbeError(f"{where}: image file not found: {path}")
        _decodable(path, where)
        return str(path.resolve())
    raise ProbeError(f"{where}: expected a path, bytes or {{'bytes': ...}}, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------
# Questions


def build_questions(
    items: Sequence[ProbeItem],
    *,
    per_entity: int = 50,
    seed: int = 0,
    on_small_category: str = "error",
) -> list[ProbeQuestion]:
    """Turn probe items into 4-choice questions (entities in name order, each entity's images in file order).

    * up to ``per_entity`` images per entity (a seeded sample when there are more);
    * exactly 3 distractors: other entities in the same image (``entities_in_image``) first, then
      entities of the same category;
    * answer letters balanced over A-D: per entity the counts differ by at most one, and so they do
      over the whole set; their order is shuffled;
    * a category with fewer than 4 entities cannot give 3 same-category distractors:
      ``on_small_category="error"`` (default) raises :class:`ProbeError` naming it and its entities;
      ``"global"`` takes the missing distractors from other categories' entities. Never fewer than
      4 options.

    The same items, arguments and seed give the same questions.
    """
    if on_small_category not in SMALL_CATEGORY_POLICIES:
        raise ProbeError(f"on_small_category: expected one of {SMALL_CATEGORY_POLICIES}, got {on_small_category!r}")
    if per_entity < 1:
        raise ProbeError(f"per_entity: expected >= 1, got {per_entity}")
    by_entity: dict[str, list[ProbeItem]] = defaultdict(list)
    category_of: dict[str, str] = {}
    for item in items:
        known = category_of.setdefault(item.entity, item.category)
        if known != item.category:
            raise ProbeError(f"entity {item.entity!r} appears in two categories: {known!r} and {item.category!r}")
        by_entity[item.entity].append(item)
    entities_of: dict[str, list[str]] = defaultdict(list)
    for entity in sorted(by_entity):
        entities_of[category_of[entity]].append(entity)

    small = {c: names for c, names in sorted(entities_of.items()) if len(names) < NUM_OPTIONS}
    if small and on_small_category == "error":
        raise SmallCategoryError(small)
    if len(by_entity) < NUM_OPTIONS:
        raise ProbeError(
            f"the probe set has {len(by_entity)} entities {sorted(by_entity)}; {NUM_OPTIONS}-choice questions need "
            f"at least {NUM_OPTIONS}"
        )

    rng = random.Random(seed)
    # A letter cycle running across entities keeps both per-entity and overall counts balanced.
    letter_cursor = rng.randrange(NUM_OPTIONS)
    questions: list[ProbeQuestion] = []
    used_ids: set[str] = set()
    for entity in sorted(by_entity):
        chosen = by_entity[entity]
        if len(chosen) > per_entity:
            keep = sorted(rng.sample(range(len(chosen)), per_entity))
            chosen = [chosen[i] for i in keep]
        letters = [LETTERS[(letter_cursor + i) % NUM_OPTIONS] for i in range(len(chosen))]
        letter_cursor = (letter_cursor + len(chosen)) % NUM_OPTIONS
        rng.shuffle(letters)
        category = category_of[entity]
        for item, letter in zip(chosen, letters, strict=True):
            distractors = _distractors(item, entities_of, rng, allow_global=on_small_category == "global")
            rng.shuffle(distractors)
            answer_index = LETTERS.index(letter)
            options = tuple(distractors[:answer_index] + [entity] + distractors[answer_index:])
            question_id = _unique_id(f"{item.image_id}::{entity}", used_ids)
            questions.append(ProbeQuestion(
                question_id=question_id,
                entity=entity,
                category=category,
                image=item.image,
                prompt=format_prompt(category, options),
                options=options,
                answer_letter=letter,
            ))
    return questions


def _distractors(
    item: ProbeItem, entities_of: Mapping[str, list[str]], rng: random.Random, *, allow_global: bool
) -> list[str]:
    needed = NUM_OPTIONS - 1
    in_image = list(dict.fromkeys(e for e in item.entities_in_image if e != item.entity))
    picked = rng.sample(in_image, min(needed, len(in_image)))
    pools = [[e for e in entities_of.get(item.category, []) if e != item.entity and e not in picked]]
    if allow_global:
        # Only after the same category is exhausted: other categories, in name order, as a fallback.
        pools.append([e for c in sorted(entities_of) if c != item.category for e in entities_of[c]])
    for pool in pools:
        pool = [e for e in pool if e not in picked and e != item.entity]
        picked += rng.sample(pool, min(needed - len(picked), len(pool)))
        if len(picked) == needed:
            return picked
    raise ProbeError(  # unreachable after build_questions' checks; kept so a bug cannot make 3-choice questions
        f"entity {item.entity!r} (category {item.category!r}): only {len(picked)} distractors available"
    )


def _unique_id(base: str, used: set[str]) -> str:
    candidate, n = base, 1
    while candidate in used:
        n += 1
        candidate = f"{base}#{n}"
    used.add(candidate)
    return candidate
