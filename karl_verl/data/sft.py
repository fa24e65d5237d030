"""``karl-verl data sft-convert``: LLaMA-Factory sharegpt CoT-SFT files -> the parquet verl's SFT trainer reads.

Input: sharegpt records, in a ``.json`` file (a JSON array, LLaMA-Factory's usual layout) or a
``.jsonl`` file (one record a line), in either spelling:

* ``{"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", ...}],
  "images": ["aircraft/0001.jpg"]}`` (the released stage-1 data);
* ``{"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", ...}], "images": [...]}``.

An optional ``system`` string, or a first turn with role ``system``, becomes the system turn.
Image paths are relative to ``images_dir`` (absolute paths are kept).

Output: one row per record with ``messages`` (role/content strings, ``<image>`` placeholders kept:
verl's ``MultiTurnSFTDataset`` turns them into image parts), ``images`` (one dict per placeholder:
``{"bytes": ..., "max_pixels": N}``, or ``{"image": "/absolute/path", "max_pixels": N}`` with
``embed_images=False``; qwen_vl_utils resizes each image to at most ``max_pixels``, as
LLaMA-Factory's ``image_max_pixels`` does), ``data_source`` and ``extra_info`` (source file, row,
entity and category when the record carries them).

Every record is checked (:func:`check_record`): ``<image>`` count equals image count, every
image exists and decodes, turns alternate user/assistant (after an optional system turn) and end
with the assistant, and every assistant turn has the KARL answer format (``<think>...</think>``
then ``<answer>...</answer>`` holding a ``(x1,y1),(x2,y2)`` box). Problems name file, row and field;
by default any problem stops the conversion with nothing written, ``skip_bad`` drops those rows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from karl_verl.atomic import atomic_path
from karl_verl.boxes import answer_span, has_reference_pair_box
from karl_verl.data.prompts import IMAGE_PLACEHOLDER
from karl_verl.data.schema import DataError, Location, RowWriter, iter_jsonl_objects, probe_image
from karl_verl.reward import has_tag_structure

#: LLaMA-Factory's ``image_max_pixels`` of the released stage-1 run (Qwen3-VL-8B).
IMAGE_MAX_PIXELS = 401408

#: sharegpt role spellings -> chat roles. ``messages`` use user/assistant; ``conversations`` human/gpt.
ROLE_NAMES: dict[str, str] = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant",
    "system": "system",
}
#: (list key, role key, content key) of the two sharegpt spellings.
SPELLINGS: tuple[tuple[str, str, str], ...] = (("messages", "role", "content"), ("conversations", "from", "value"))

VIDEO_PLACEHOLDER = "<video>"
#: Problems listed in full before the rest are only counted.
MAX_LISTED_PROBLEMS = 20


class SftDataProblems(ValueError):
    """Several bad rows; ``problems`` holds one :class:`DataError` per row."""

    def __init__(self, problems: Sequence[DataError], total_rows: int) -> None:
        self.problems = list(problems)
        listed = "\n".join(f"  {problem}" for problem in self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.problems)} of {total_rows} rows have problems (nothing written; "
                         f"--skip-bad drops them):\n{listed}{tail}")


@dataclass(frozen=True)
class SftExample:
    """One checked record: chat turns with ``<image>`` placeholders and the resolved image files."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    images: tuple[Path, ...]
    where: Location
    entity: str | None = None
    category: str | None = None


def iter_sharegpt_records(path: str | Path) -> Iterator[tuple[Location, Any]]:
    """(location, record) of every record of a sharegpt ``.json`` (array) or ``.jsonl`` file; rows are 1-based."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise DataError(name, None, None, f"sharegpt file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        for line_number, record in iter_jsonl_objects(path, name):
            yield Location(name, line_number), record
        return
    if path.suffix.lower() != ".json":
        raise DataError(name, None, None, "expected a .json (array of records) or .jsonl sharegpt file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(name, None, None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:
        raise DataError(name, None, None, f"invalid JSON: {err}") from None
    if not isinstance(data, list):
        raise DataError(name, None, None, f"expected a JSON array of records, got {type(data).__name__}")
    for row, record in enumerate(data, start=1):
        yield Location(name, row), record


@dataclass(frozen=True)
class Turn:
    role: str  # user, assistant or system
    content: str
    field: str  # where it came from, e.g. "messages[1].content"


def _turns(record: Mapping[str, Any], where: Location) -> list[Turn]:
    present = [spelling for spelling in SPELLINGS if spelling[0] in record]
    if len(present) != 1:
        found = "both 'messages' and 'conversations'" if present else f"keys {sorted(record)}"
        raise where.error(None, f"expected a 'messages' (role/content) or a 'conversations' (from/value) list, "
                                f"found {found}")
    list_key, role_key, content_key = present[0]
    entries = record[list_key]
    if not isinstance(entries, list) or not entries:
        raise where.error(list_key, f"expected a non-empty list of turns, got {entries!r:.100}")
    turns: list[Turn] = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise where.error("system", f"expected a string, got {type(system).__name__}")
        if system.strip():
            turns.append(Turn("system", system, "system"))
    for i, entry in enumerate(entries):
        name = f"{list_key}[{i}]"
        if not isinstance(entry, Mapping):
            raise where.error(name, f"expected an object with {role_key!r} and {content_key!r}, got {entry!r:.100}")
        role, content = entry.get(role_key), entry.get(content_key)
        if role not in ROLE_NAMES:
            raise where.error(f"{name}.{role_key}", f"expected one of {sorted(ROLE_NAMES)}, got {role!r}")
        if not isinstance(content, str):
            raise where.error(f"{name}.{content_key}", f"expected a string, got {type(content).__name__}")
        turns.append(Turn(ROLE_NAMES[role], content, f"{name}.{content_key}"))
    systems = [i for i, turn in enumerate(turns) if turn.role == "system"]
    if systems and systems != [0]:
        raise where.error(turns[systems[-1]].field, "a system turn may only come first, and only once")
    return turns


def _check_turn_order(turns: Sequence[Turn], where: Location) -> None:
    body = turns[1:] if turns[0].role == "system" else turns
    if not body:
        raise where.error(turns[0].field, "no user or assistant turn")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise where.error(turn.field, f"expected role {expected!r} (turns alternate user/assistant after an "
                                          f"optional system turn), got {turn.role!r}")
    if body[-1].role != "assistant":
        raise where.error(body[-1].field, "the last turn must be the assistant's")


#: Why a text is not in the KARL answer format: reason code -> message.
FORMAT_PROBLEMS: dict[str, str] = {
    "format": "expected <think>...</think> then <answer>...</answer> from the first character",
    "no_box": "no (x1,y1),(x2,y2) box inside <answer>...</answer>",
}


def answer_format_problem(text: str) -> str | None:
    """The :data:`FORMAT_PROBLEMS` code of ``text``, or None when it has the KARL answer format.

    The format the stage-2 reward pays for: ``<think>...</think>`` from the first character, then
    ``<answer>...</answer>``, and a ``(x1,y1),(x2,y2)`` box inside the first answer span.
    """
    if not has_tag_structure(text):
        return "format"
    answer = answer_span(text)
    if answer is None or not has_reference_pair_box(answer):
        return "no_box"
    return None


def check_assistant_answer(text: str) -> str | None:
    """Why an assistant turn is not in the KARL answer format (a message), or None when it is.

    >>> check_assistant_answer("<think>the twin tail</think><answer>(10,20),(30,40)</answer>") is None
    True
    >>> check_assistant_answer("<answer>(10,20),(30,40)</answer>")
    'expected <think>...</think> then <answer>...</answer> from the first character'
    """
    problem = answer_format_problem(text)
    return None if problem is None else FORMAT_PROBLEMS[problem]


def check_record(record: Any, where: Location, images_dir: Path | None) -> SftExample:
    """Validate one sharegpt record; raise :class:`DataError` naming the first problem's field."""
    if not isinstance(record, Mapping):
        raise where.error(None, f"expected a JSON object, got {type(record).__name__}")
    turns = _turns(record, where)
    _check_turn_order(turns, where)
    placeholders = 0
    for turn in turns:
        if VIDEO_PLACEHOLDER in turn.content:
            raise where.error(turn.field, f"{VIDEO_PLACEHOLDER} placeholders are not supported")
        count = turn.content.count(IMAGE_PLACEHOLDER)
        if count and turn.role != "user":
            raise where.error(turn.field, f"{IMAGE_PLACEHOLDER} placeholder in a {turn.role} turn "
                                          "(images go in user turns)")
        placeholders += count
        if turn.role == "assistant" and (problem := check_assistant_answer(turn.content)) is not None:
            raise where.error(turn.field, problem)
    images = record.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise where.error("images", f"expected a list of image paths, got {images!r:.100}")
    if placeholders != len(images):
        raise where.error("images", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
    paths = []
    for i, item in enumerate(images):
        if not item.strip():
            raise where.error(f"images[{i}]", "empty image path")
        path = Path(item).expanduser()
        if not path.is_absolute() and images_dir is not None:
            path = images_dir / path
        probe_image(None, path, where, f"images[{i}]")
        paths.append(path.resolve())
    meta = record.get("karl") if isinstance(record.get("karl"), Mapping) else {}
    entity, category = meta.get("entity"), meta.get("category")
    return SftExample(
        messages=tuple((turn.role, turn.content) for turn in turns), images=tuple(paths), where=where,
        entity=entity if isinstance(entity, str) else None, category=category if isinstance(category, str) else None,
    )


def sft_schema(embed_images: bool = True) -> Any:
    """pyarrow schema of the SFT parquet.

    An image struct has ``bytes`` or ``image`` (a path), never both: verl's ``process_image``
    asserts that a dict with ``bytes`` has no ``image`` key, and a struct column gives every row all
    of its fields.
    """
    import pyarrow as pa

    image_field = ("bytes", pa.binary()) if embed_images else ("image", pa.string())
    return pa.schema([
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([image_field, ("max_pixels", pa.int64())]))),
        ("data_source", pa.string()),
        ("extra_info", pa.struct([("source", pa.string()), ("row", pa.int64()), ("index", pa.int64()),
                                  ("entity", pa.string()), ("category", pa.string())])),
    ])


def sft_row(example: SftExample, index: int, *, max_pixels: int = IMAGE_MAX_PIXELS,
            embed_images: bool = True) -> dict[str, Any]:
    """One output row for ``example`` (``index``: its row number in the output, from 0)."""
    if embed_images:
        images = [{"bytes": path.read_bytes(), "max_pixels": int(max_pixels)} for path in example.images]
    else:
        images = [{"image": str(path), "max_pixels": int(max_pixels)} for path in example.images]
    return {
        "messages": [{"role": role, "content": content} for role, content in example.messages],
        "images": images,
        "data_source": f"kvg_cot/{example.category}" if example.category else f"sharegpt/{example.where.source}",
        "extra_info": {"source": example.where.source, "row": example.where.row, "index": index,
                       "entity": example.entity, "category": example.category},
    }


@dataclass
class SftConvertSummary:
    """What a conversion read, wrote and dropped."""

    out: Path
    rows: int = 0
    images: int = 0
    skipped: list[DataError] = field(default_factory=list)
    per_source: Counter = field(default_factory=Counter)
    embed_images: bool = True

    def format(self) -> str:
        sources = ", ".join(f"{name} {count}" for name, count in sorted(self.per_source.items()))
        how = "embedded" if self.embed_images else "by absolute path"
        lines = [f"wrote {self.rows} rows ({self.images} images, {how}) to {self.out}", f"  sources: {sources}"]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} bad rows (--skip-bad), e.g.:")
            lines.extend(f"    {problem}" for problem in self.skipped[:5])
        return "\n".join(lines)


def convert_sharegpt(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    images_dir: str | Path | None = None,
    max_pixels: int = IMAGE_MAX_PIXELS,
    embed_images: bool = True,
    skip_bad: bool = False,
    progress: bool = True,
) -> SftConvertSummary:
    """Convert sharegpt files into one SFT parquet for ``python -m verl.trainer.sft_trainer``.

    ``images_dir``: the folder relative image paths start from (default: each file's own folder).
    All rows are checked before anything is written; with problems and without ``skip_bad``,
    :class:`SftDataProblems` lists them and ``out`` is left as it was.
    """
    from tqdm import tqdm

    out = Path(out)
    if out.suffix != ".parquet":
        raise ValueError(f"{out}: the output must end in .parquet (verl's MultiTurnSFTDataset reads parquet only)")
    if not inputs:
        raise ValueError("no sharegpt files given")
    if max_pixels < 1:
        raise ValueError(f"max_pixels: expected a positive integer, got {max_pixels}")
    examples: list[SftExample] = []
    problems: list[DataError] = []
    total = 0
    for path in map(Path, inputs):
        root = Path(images_dir) if images_dir is not None else path.parent
        for where, record in tqdm(iter_sharegpt_records(path), desc=f"check {path.name}", unit="row",
                                  disable=not progress):
            total += 1
            try:
                examples.append(check_record(record, where, root))
            except DataError as problem:
                problems.append(problem)
    if problems and not skip_bad:
        raise SftDataProblems(problems, total)
    if not examples:
        raise ValueError(f"no usable rows in {', '.join(str(p) for p in inputs)}"
                         + (f" ({len(problems)} bad rows skipped)" if problems else ""))
    summary = SftConvertSummary(out=out, skipped=problems, embed_images=embed_images)
    with atomic_path(out) as tmp:
        writer = RowWriter(tmp, sft_schema(embed_images), row_group_size=64)
        try:
            for example in tqdm(examples, desc="write", unit="row", disable=not progress):
                writer.add(sft_row(example, writer.count, max_pixels=max_pixels, embed_images=embed_images))
                summary.images += len(example.images)
                summary.per_source[example.where.source] += 1
        finally:
            writer.close()
        summary.rows = writer.count
    return summary
