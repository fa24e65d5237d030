"""Reading annotation files: JSONL, CSV, parquet, or a ``datasets`` dataset saved to disk.

Each record holds an image (a path, relative to the annotation file's folder unless an image
root is given, or the encoded bytes), ``entity``, ``category``, one or more boxes, and the
coordinate system the boxes are in (a per-row ``coords`` field or a default for the file; see
:data:`karl_verl.data.schema.COORDINATE_SYSTEMS`). Optional: ``split`` and ``id``.

Records are read lazily and validated one by one into :class:`~karl_verl.data.schema.Annotation`;
the first bad record raises a :class:`~karl_verl.data.schema.DataError` naming file, row and field.
Rows are numbered from 1: the line number in JSONL, the data row (header excluded) in CSV, the
row in parquet and ``datasets``.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from karl_verl.data.schema import (
    COORDINATE_SYSTEMS,
    Annotation,
    DataError,
    Location,
    image_ref_from_value,
    iter_jsonl_objects,
    open_parquet,
    parse_boxes,
    probe_image,
    to_pixels,
)

#: Canonical fields and the column names tried for each, in order, when none is mapped explicitly.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_path", "image_bytes"),
    "entity": ("entity",),
    "category": ("category",),
    "boxes": ("boxes", "box", "bbox"),
    "coords": ("coords",),
    "split": ("split",),
    "id": ("id", "question_id"),
}

#: CSV files may give one box as four columns instead of a ``boxes`` column.
CORNER_COLUMNS = ("x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class ReadOptions:
    """How to read annotation records.

    ``coords``: coordinate system of rows without a ``coords`` field (None: every row needs one).
    ``field_map``: canonical field -> column name, for files that name columns differently.
    ``allow_missing_boxes``: a record without boxes gets the whole image as its box (compose
    sources such as Food-101 come without boxes).
    """

    coords: str | None = None
    split: str = "train"
    image_root: Path | None = None
    field_map: Mapping[str, str] = field(default_factory=dict)
    hf_split: str | None = None
    allow_missing_boxes: bool = False

    def __post_init__(self) -> None:
        if self.coords is not None and self.coords not in COORDINATE_SYSTEMS:
            raise ValueError(f"coords: expected one of {list(COORDINATE_SYSTEMS)}, got {self.coords!r}")
        unknown = sorted(set(self.field_map) - set(FIELD_ALIASES))
        if unknown:
            raise ValueError(f"field map: unknown field(s) {unknown}; expected some of {sorted(FIELD_ALIASES)}")


def parse_field_map(items: list[str] | None) -> dict[str, str]:
    """``["entity=label", "boxes=bbox"]`` -> ``{"entity": "label", "boxes": "bbox"}``."""
    mapping = {}
    for item in items or []:
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise ValueError(f"--field: expected FIELD=COLUMN, got {item!r}")
        mapping[name.strip()] = column.strip()
    return mapping


def _is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))


def count_records(path: Path) -> int | None:
    """Number of records, cheaply where possible (for the progress bar); None when unknown."""
    suffix = path.suffix.lower()
    if not path.is_file():
        return None  # the reader reports it
    if suffix == ".jsonl":
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader, with its name
            return None
    return None


def iter_records(path: str | Path, options: ReadOptions | None = None) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Raw records of an annotation file with their locations (no validation beyond parsing)."""
    options = options or ReadOptions()
    path = Path(path)
    name = path.name
    if _is_datasets_dir(path):
        yield from _iter_datasets(path, options)
        return
    if not path.is_file():
        raise DataError(name, None, None, f"annotation file not found: {path}")
    try:
        yield from _iter_file(path, name)
    except UnicodeDecodeError as err:
        raise DataError(name, None, None, f"not UTF-8 text ({err})") from None


def _iter_file(path: Path, name: str) -> Iterator[tuple[Location, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for line_number, record in iter_jsonl_objects(path, name):
            yield Location(name, line_number), record
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            for row_number, record in enumerate(csv.DictReader(handle), start=1):
                yield Location(name, row_number), _csv_record(record)
    elif suffix == ".parquet":
        parquet = open_parquet(path, name)
        row_number = 0
        for batch in parquet.iter_batches(batch_size=64):
            for record in batch.to_pylist():
                row_number += 1
                yield Location(name, row_number), record
    else:
        raise DataError(name, None, None, "unsupported annotation file: expected .jsonl, .csv, .parquet "
                        "or a folder written by datasets' save_to_disk")


def _csv_record(record: dict[str, Any]) -> dict[str, Any]:
    # Empty CSV cells mean "absent", as a missing JSON key would.
    record = {key: value for key, value in record.items() if key is not None and value not in (None, "")}
    if not any(alias in record for alias in FIELD_ALIASES["boxes"]) and all(c in record for c in CORNER_COLUMNS):
        record["boxes"] = ",".join(record.pop(c) for c in CORNER_COLUMNS)
    return record


def _iter_datasets(path: Path, options: ReadOptions) -> Iterator[tuple[Location, dict[str, Any]]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = options.hf_split or (splits[0] if len(splits) == 1 else None)
        if split not in loaded:
            raise DataError(path.name, None, None, f"a dataset with splits {splits}: choose one (--hf-split)")
        loaded = loaded[split]
        name = f"{path.name}[{split}]"
    else:
        name = path.name
    # Keep images encoded: decoding to PIL and re-encoding would change the pixels of JPEGs.
    for column, feature in loaded.features.items():
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(column, datasets.Image(decode=False))
    for row_number, record in enumerate(loaded, start=1):
        yield Location(name, row_number), record


def _field(record: Mapping[str, Any], canonical: str, options: ReadOptions) -> tuple[str, Any]:
    """(column name, value) of a canonical field; value None when absent."""
    if canonical in options.field_map:
        column = options.field_map[canonical]
        return column, record.get(column)
    for column in FIELD_ALIASES[canonical]:
        if record.get(column) is not None:
            return column, record[column]
    return FIELD_ALIASES[canonical][0], None


_RESERVED_TOKENS = ("<image>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>")


def _text(record: Mapping[str, Any], canonical: str, options: ReadOptions, where: Location, *,
          default: str | None = None) -> str:
    column, value = _field(record, canonical, options)
    if value is None:
        if default is not None:
            return default
        raise where.error(column, "missing")
    if canonical == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise where.error(column, f"expected a string, got {type(value).__name__} {value!r}")
    text = value.strip()
    if not text:
        raise where.error(column, "empty string")
    if canonical in ("entity", "category"):
        # These go into the prompt and the ground truth: a placeholder or marker inside would shift
        # the image count or the entity the reward reads.
        for token in _RESERVED_TOKENS:
            if token in text:
                raise where.error(column, f"contains {token!r}, which the prompt format reserves: {text!r}")
    return text


def to_annotation(record: Mapping[str, Any], where: Location, options: ReadOptions) -> Annotation:
    """Validate one raw record: image decodes, text fields present, boxes finite and inside the image."""
    entity = _text(record, "entity", options, where)
    category = _text(record, "category", options, where)
    split = _text(record, "split", options, where, default=options.split)
    record_id = None if _field(record, "id", options)[1] is None else _text(record, "id", options, where)

    image_column, image_value = _field(record, "image", options)
    if image_value is None:
        raise where.error(image_column, "missing")
    image = image_ref_from_value(image_value, where, options.image_root, image_column)
    width, height = probe_image(image.data, image.path, where, image_column)

    boxes_column, boxes_value = _field(record, "boxes", options)
    if boxes_value is None or (hasattr(boxes_value, "__len__") and len(boxes_value) == 0):
        if not options.allow_missing_boxes:
            raise where.error(boxes_column, "missing: expected a box [x1, y1, x2, y2] or a list of boxes")
        pixel_boxes = [(0.0, 0.0, float(width), float(height))]
    else:
        coords_column, coords = _field(record, "coords", options)
        coords = coords if coords is not None else options.coords
        if coords is None:
            raise where.error(coords_column, f"missing: give the coordinate system per row or for the file "
                                             f"(one of {list(COORDINATE_SYSTEMS)})")
        if coords not in COORDINATE_SYSTEMS:
            raise where.error(coords_column, f"expected one of {list(COORDINATE_SYSTEMS)}, got {coords!r}")
        pixel_boxes = [
            to_pixels(box, coords, width, height, where, boxes_column)
            for box in parse_boxes(boxes_value, where, boxes_column)
        ]
    return Annotation(
        image=image,
        width=width,
        height=height,
        entity=entity,
        category=category,
        boxes=tuple(pixel_boxes),
        split=split,
        where=where,
        id=record_id,
    )


def iter_annotations(path: str | Path, options: ReadOptions | None = None) -> Iterator[Annotation]:
    """Validated annotations of one file, in file order."""
    options = options or ReadOptions()
    path = Path(path)
    if options.image_root is None:
        # Relative image paths are relative to the annotation file's folder unless told otherwise.
        options = dataclasses.replace(options, image_root=path if path.is_dir() else path.parent)
    for where, record in iter_records(path, options):
        yield to_annotation(record, where, options)
