"""What a KVG row is: validated annotations, box coordinate systems, and verl's RL parquet schema.

Every check that names a file, a row and a field lives here, so ``convert``, ``compose``,
``filter`` and the evaluator report bad input the same way::

    annotations.jsonl row 17, field 'boxes': expected 4 numbers, got [1, 2, 3]

Boxes inside this package are ``(x1, y1, x2, y2)`` floats in pixels of their image until they are
written out; output rows carry integers on Qwen's 0-1000 grid (docs/DATA_FORMATS.md).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karl_verl.data import prompts

#: How an annotation's box numbers are to be read.
#:
#: * ``pixel_xyxy``: absolute pixels of the image, corners (x1, y1, x2, y2)
#: * ``pixel_xywh``: absolute pixels, top-left corner plus width and height (COCO)
#: * ``unit_xyxy``: corners relative to the image size, 0-1
#: * ``grid1000_xyxy``: corners on Qwen's 0-1000 grid
COORDINATE_SYSTEMS: tuple[str, ...] = ("pixel_xyxy", "pixel_xywh", "unit_xyxy", "grid1000_xyxy")

#: A pixel box may stick out of its image by this much (rounding in the source annotations, or
#: 1-based inclusive corners as in FGVC-Aircraft); it is clipped. Further out is an error.
EDGE_TOLERANCE_PX = 1.0

GRID = 1000

PixelBox = tuple[float, float, float, float]
GridBox = tuple[int, int, int, int]


class DataError(ValueError):
    """Bad input data; the message names the file, the row (1-based) and the field."""

    def __init__(self, source: str, row: int | None, field_name: str | None, message: str) -> None:
        self.source, self.row, self.field, self.message = source, row, field_name, message
        where = str(source)
        if row is not None:
            where += f" row {row}"
        if field_name is not None:
            where += f", field {field_name!r}" if row is not None else f" field {field_name!r}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their args; ours has four, so worker processes can send it back whole.
        return type(self), (self.source, self.row, self.field, self.message)


@dataclass(frozen=True)
class Location:
    """Where a value came from, for error messages."""

    source: str
    row: int

    def error(self, field_name: str | None, message: str) -> DataError:
        return DataError(self.source, self.row, field_name, message)

    def __str__(self) -> str:
        return f"{self.source}:{self.row}"


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageRef:
    """An encoded image, either in memory or as a file read on demand (keeps large sets out of RAM)."""

    data: bytes | None = None
    path: Path | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


def iter_jsonl_objects(path: Path, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a bad line raises DataError."""
    import json

    # Lines are read as bytes and decoded one by one, so a non-UTF-8 line is reported with its number.
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(name, line_number, None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:
                raise DataError(name, line_number, None, f"invalid JSON: {err}") from None
            if not isinstance(record, dict):
                raise DataError(name, line_number, None, f"expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def open_parquet(path: Path, name: str) -> Any:
    """``pyarrow.parquet.ParquetFile(path)``; a file pyarrow cannot read raises DataError naming it."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        raise DataError(name, None, None, f"not a readable parquet file ({type(err).__name__}: {err})") from None


def probe_image(data: bytes | None, path: Path | None, where: Location, field_name: str = "image") -> tuple[int, int]:
    """Decode an image fully (so corrupt bytes fail here, not inside a training worker); (width, height)."""
    from PIL import Image, UnidentifiedImageError

    if data is None and path is not None and not path.is_file():
        raise where.error(field_name, f"image file not found: {path}")
    try:
        source = io.BytesIO(data) if data is not None else path
        with Image.open(source) as image:  # type: ignore[arg-type]
            image.load()
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        what = "image bytes" if data is not None else f"image file {path}"
        raise where.error(field_name, f"cannot decode {what}: {err}") from None
    if width <= 0 or height <= 0:
        raise where.error(field_name, f"image has no pixels ({width}x{height})")
    return width, height


def image_ref_from_value(value: Any, where: Location, image_root: Path | None, field_name: str = "image") -> ImageRef:
    """Accept a path (absolute, or relative to ``image_root``), raw bytes, ``{"bytes": ..., "path": ...}``
    (what parquet and ``datasets`` store) or a PIL image (encoded to PNG)."""
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return image_ref_from_value(data, where, image_root, field_name)
        if path:
            return image_ref_from_value(path, where, image_root, field_name)
        raise where.error(field_name, "expected 'bytes' or 'path' in the image object, both are empty")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise where.error(field_name, "empty image bytes")
        return ImageRef(data=bytes(value))
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if not text.strip():
            raise where.error(field_name, "empty image path")
        path = Path(text).expanduser()
        if not path.is_absolute() and image_root is not None:
            path = image_root / path
        return ImageRef(path=path)
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image (datasets' decoded Image feature)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return ImageRef(data=buffer.getvalue())
    raise where.error(field_name, f"expected an image path, bytes or {{'bytes': ...}}, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Boxes


def parse_number(value: Any, where: Location, field_name: str) -> float:
    if isinstance(value, bool):
        raise where.error(field_name, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise where.error(field_name, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise where.error(field_name, f"expected a finite number, got {value!r}")
    return number


def parse_boxes(value: Any, where: Location, field_name: str = "boxes") -> list[tuple[float, float, float, float]]:
    """One box ``[a, b, c, d]`` or several ``[[...], [...]]`` -> list of 4-tuples of finite floats.

    Strings are read as JSON, or as 4 numbers separated by commas or spaces (several boxes
    separated by ``;``), which is how CSV files carry them.
    """
    if isinstance(value, str):
        value = _parse_box_text(value, where, field_name)
    if hasattr(value, "tolist"):  # numpy arrays from parquet / datasets
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise where.error(field_name, f"expected a box [x1, y1, x2, y2] or a list of boxes, got {value!r}")
    items = list(value)
    if all(not isinstance(v, (list, tuple)) and not hasattr(v, "tolist") for v in items):
        items = [items]
    boxes = []
    for item in items:
        if hasattr(item, "tolist"):
            item = item.tolist()
        if not isinstance(item, (list, tuple)) or len(item) != 4:
            raise where.error(field_name, f"expected 4 numbers, got {item!r}")
        numbers = []
        for number in item:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise where.error(field_name, f"expected 4 numbers, got {item!r}")
            if not math.isfinite(number):
                raise where.error(field_name, f"expected finite numbers, got {item!r}")
            numbers.append(float(number))
        boxes.append(tuple(numbers))
    return boxes  # type: ignore[return-value]


def _parse_box_text(text: str, where: Location, field_name: str) -> Any:
    import json

    text = text.strip()
    if not text:
        raise where.error(field_name, "empty")
    if text[0] in "[{":
        try:
            return json.loads(text)
        except ValueError as err:
            raise where.error(field_name, f"invalid JSON {text!r}: {err}") from None
    boxes = []
    for part in text.split(";"):
        tokens = [t for t in part.replace(",", " ").split() if t]
        try:
            boxes.append([float(t) for t in tokens])
        except ValueError:
            raise where.error(field_name, f"expected numbers, got {part.strip()!r}") from None
    return boxes


def to_pixels(
    box: Sequence[float], coords: str, width: int, height: int, where: Location, field_name: str = "boxes"
) -> PixelBox:
    """Read ``box`` in coordinate system ``coords`` as a valid pixel box inside a ``width`` x ``height`` image.

    Corners must be ordered (x1 < x2, y1 < y2); a box may stick out by
    :data:`EDGE_TOLERANCE_PX` and is then clipped; anything further out is an error.
    """
    a, b, c, d = (float(v) for v in box)
    if coords == "pixel_xyxy":
        x1, y1, x2, y2 = a, b, c, d
    elif coords == "pixel_xywh":
        x1, y1, x2, y2 = a, b, a + c, b + d
    elif coords == "unit_xyxy":
        x1, y1, x2, y2 = a * width, b * height, c * width, d * height
    elif coords == "grid1000_xyxy":
        x1, y1, x2, y2 = a * width / GRID, b * height / GRID, c * width / GRID, d * height / GRID
    else:
        raise where.error("coords", f"expected one of {list(COORDINATE_SYSTEMS)}, got {coords!r}")
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise where.error(field_name, f"box {list(box)} is not finite")
    if not (x1 < x2 and y1 < y2):
        raise where.error(field_name, f"box {list(box)} ({coords}) has no area: expected x1 < x2 and y1 < y2")
    tol = EDGE_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise where.error(
            field_name,
            f"box {list(box)} ({coords}) lies outside the {width}x{height} image "
            f"(pixels {x1:g}, {y1:g}, {x2:g}, {y2:g})",
        )
    return (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))


def to_grid(box: PixelBox, width: int, height: int) -> GridBox:
    """A pixel box on the integer 0-1000 grid (rounded to nearest, half away from zero).

    >>> to_grid((0, 0, 50, 25), 100, 100)
    (0, 0, 500, 250)
    """
    scale = (GRID / width, GRID / height, GRID / width, GRID / height)
    values = [min(GRID, max(0, math.floor(v * s + 0.5))) for v, s in zip(box, scale, strict=True)]
    return tuple(values)  # type: ignore[return-value]


def check_grid_box(box: GridBox, where: Location, field_name: str = "boxes") -> GridBox:
    """A box too thin to survive rounding onto the 0-1000 grid is useless as a target."""
    if not (box[0] < box[2] and box[1] < box[3]):
        raise where.error(field_name, f"box collapses to zero area on the 0-1000 grid: {list(box)}")
    return box


# ---------------------------------------------------------------------------------------------
# Annotations


@dataclass(frozen=True)
class Annotation:
    """One validated annotation: an image, one entity of one category, and its box(es) in pixels."""

    image: ImageRef
    width: int
    height: int
    entity: str
    category: str
    boxes: tuple[PixelBox, ...]
    split: str
    where: Location
    id: str | None = None

    def grid_boxes(self) -> list[GridBox]:
        return [check_grid_box(to_grid(box, self.width, self.height), self.where) for box in self.boxes]


# ---------------------------------------------------------------------------------------------
# verl RL parquet


def rl_schema(extra_info_fields: Sequence[tuple[str, Any]] = ()) -> Any:
    """pyarrow schema of verl's RL parquet as ``RLHFDataset`` reads it (docs/DATA_FORMATS.md, "RL parquet").

    ``extra_info`` always has ``entity``, ``category``, ``image_width``, ``image_height``,
    ``split``, ``index`` and ``boxes`` (every ground-truth box on the 0-1000 grid; the
    ground-truth string holds the first); ``extra_info_fields`` adds (name, pyarrow type) pairs.
    """
    import pyarrow as pa

    extra = [
        ("entity", pa.string()),
        ("category", pa.string()),
        ("image_width", pa.int64()),
        ("image_height", pa.int64()),
        ("split", pa.string()),
        ("index", pa.int64()),
        ("boxes", pa.list_(pa.list_(pa.int64()))),
        *extra_info_fields,
    ]
    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct(extra)),
    ])


def rl_row(
    *,
    image_bytes: bytes,
    width: int,
    height: int,
    entity: str,
    category: str,
    boxes: Sequence[GridBox],
    split: str,
    index: int,
    extra_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of verl RL parquet for the KVG task (one image, one target entity)."""
    prompt_text = prompts.grounding_prompt(prompts.grounding_query(entity), num_images=1)
    return {
        "data_source": prompts.data_source(category),
        "prompt": prompts.chat_messages(prompt_text),
        "images": [{"bytes": image_bytes}],
        "ability": prompts.ABILITY,
        "reward_model": {"style": "rule", "ground_truth": prompts.ground_truth(entity, boxes[0])},
        "extra_info": {
            "entity": entity,
            "category": category,
            "image_width": int(width),
            "image_height": int(height),
            "split": split,
            "index": int(index),
            "boxes": [list(box) for box in boxes],
            **(extra_info or {}),
        },
    }


class RowWriter:
    """Streams rows into a parquet file in row groups, so a large set never sits in memory whole."""

    def __init__(self, path: Path, schema: Any, row_group_size: int = 256) -> None:
        import pyarrow.parquet as pq

        self.schema = schema
        self.row_group_size = row_group_size
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self._writer = pq.ParquetWriter(str(path), schema)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self._writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
