"""``karl-verl data convert``: KVG annotations -> verl RL parquet (the schema ``RLHFDataset`` reads).

One output row per annotation: one ``<image>`` placeholder and one image, the KVG query with
entity markers and the answer-format suffix (:mod:`karl_verl.data.prompts`), the ground truth
``<|object_ref_start|>E<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on the 0-1000
grid, and ``extra_info`` with ``entity``, ``category``, ``image_width``, ``image_height``,
``split``, ``index`` (row number in the output, from 0), ``boxes`` and ``source_id``.

An annotation with several boxes keeps them all in ``extra_info["boxes"]``; the ground-truth
string, which the reward reads, holds the first (the released reward scores one box).

Every row is validated before it is written; the output appears only when every row passed
(written to a temporary file and renamed, see :mod:`karl_verl.atomic`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from karl_verl.atomic import atomic_path
from karl_verl.data.annotations import ReadOptions, count_records, iter_annotations
from karl_verl.data.schema import RowWriter, rl_row, rl_schema


@dataclass
class ConvertSummary:
    """What a conversion wrote."""

    out: Path
    rows: int = 0
    multi_box_rows: int = 0
    per_category: Counter = field(default_factory=Counter)
    per_split: Counter = field(default_factory=Counter)

    def format(self) -> str:
        categories = ", ".join(f"{name} {count}" for name, count in sorted(self.per_category.items()))
        splits = ", ".join(f"{name} {count}" for name, count in sorted(self.per_split.items()))
        lines = [
            f"wrote {self.rows} rows to {self.out}",
            f"  categories: {categories}",
            f"  splits: {splits}",
        ]
        if self.multi_box_rows:
            lines.append(f"  {self.multi_box_rows} rows have several boxes: ground truth holds the first, "
                         "extra_info.boxes all of them")
        return "\n".join(lines)


def convert_annotations(
    inputs: Sequence[str | Path],
    out: str | Path,
    options: ReadOptions | None = None,
    *,
    progress: bool = True,
) -> ConvertSummary:
    """Convert annotation files (JSONL, CSV, parquet or a ``datasets`` folder) into one RL parquet.

    Raises :class:`~karl_verl.data.schema.DataError` naming file, row and field at the first bad
    record; ``out`` is then left as it was.
    """
    from tqdm import tqdm

    out = Path(out)
    if out.suffix != ".parquet":
        raise ValueError(f"{out}: the output must end in .parquet (verl's RLHFDataset picks the reader by suffix)")
    if not inputs:
        raise ValueError("no annotation files given")
    options = options or ReadOptions()
    summary = ConvertSummary(out=out)
    with atomic_path(out) as tmp:
        writer = RowWriter(tmp, rl_schema([("source_id", _string_type())]))
        try:
            for path in inputs:
                path = Path(path)
                records = iter_annotations(path, options)
                for annotation in tqdm(records, total=count_records(path), desc=f"convert {path.name}",
                                       unit="row", disable=not progress):
                    writer.add(rl_row(
                        image_bytes=annotation.image.read(),
                        width=annotation.width,
                        height=annotation.height,
                        entity=annotation.entity,
                        category=annotation.category,
                        boxes=annotation.grid_boxes(),
                        split=annotation.split,
                        index=writer.count,
                        extra_info={"source_id": annotation.id or str(annotation.where)},
                    ))
                    summary.per_category[annotation.category] += 1
                    summary.per_split[annotation.split] += 1
                    summary.multi_box_rows += len(annotation.boxes) > 1
        finally:
            writer.close()
        if writer.count == 0:
            raise ValueError(f"no annotation records in {', '.join(str(p) for p in inputs)}")
        summary.rows = writer.count
    return summary


def _string_type():  # pyarrow is imported on use only: no work at import time
    import pyarrow as pa

    return pa.string()
