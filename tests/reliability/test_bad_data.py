"""Bad data refused (issue 6.5): each defect gives an error naming file, row and field, and no output.

A bad dataset must be refused before it costs GPU time. For every defect of the issue (corrupt
image bytes, a missing image file, a box outside the image or with NaN, a wrong type in a column,
duplicate case ids in the benchmark) and every input format, the public readers raise
:class:`~karl_verl.data.schema.DataError` whose ``source``, ``row`` and ``field`` point at the
defect, the command line exits with status 2 and one line saying the same, and the output file (or
folder of outputs) does not appear, temporary files included.

The defect is always put in row 2 of 3 (row 1 where a parquet column must change type as a whole),
so an error that names the wrong row is caught.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reliability_kit import record

from karl_verl.cli import main as cli_main
from karl_verl.data.annotations import ReadOptions
from karl_verl.data.compose import ComposeConfig, compose_dataset
from karl_verl.data.convert import convert_annotations
from karl_verl.data.schema import DataError
from karl_verl.evaluation.bench import load_bench, load_predictions
from karl_verl.evaluation.runner import run_eval
from karl_verl.probe.questions import ProbeError, load_probe_set

SIZE = (64, 48)


def _png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = SIZE) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n but the rest is not an image"


def _truncated() -> bytes:
    data = _png()
    return data[: len(data) // 2]


def _assert_names(err: DataError, source: str, row: int | None, field: str | None) -> None:
    assert (err.source, err.row, err.field) == (source, row, field), str(err)
    text = str(err)
    assert source in text
    if row is not None:
        assert f"row {row}" in text
    if field is not None:
        assert repr(field) in text


def _no_output(folder: Path, *names: str) -> None:
    present = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert not [name for name in names if name in present], present
    assert not [name for name in present if name.endswith(".tmp")], present


# ---------------------------------------------------------------------------------------------
# Annotations (``karl-verl data convert`` / ``compose``): JSONL, CSV, parquet


@dataclass(frozen=True)
class Defect:
    """One defect: how it changes row 2 (``records[1]``), and the field the error must name."""

    name: str
    apply: Callable[[list[dict], Path], None]
    field: str
    message: str
    formats: tuple[str, ...] = ("jsonl", "csv", "parquet")


def _set(key: str, value: Any, **others: Any) -> Callable[[list[dict], Path], None]:
    def apply(records: list[dict], root: Path) -> None:
        records[1].update({key: value, **others})

    return apply


def _image_file(data: bytes) -> Callable[[list[dict], Path], None]:
    def apply(records: list[dict], root: Path) -> None:
        (root / "bad.png").write_bytes(data)
        records[1]["image"] = "bad.png"

    return apply


ANNOTATION_DEFECTS = [
    Defect("corrupt image file", _image_file(CORRUPT), "image", "cannot decode"),
    Defect("truncated image file", _image_file(_truncated()), "image", "cannot decode"),
    Defect("empty image file", _image_file(b""), "image", "cannot decode"),
    Defect("missing image file", _set("image", "no_such_image.png"), "image", "image file not found"),
    Defect("corrupt image bytes", _set("image", CORRUPT), "image", "cannot decode", ("parquet",)),
    Defect("box outside the image", _set("boxes", [10.0, 10.0, 500.0, 40.0]), "boxes", "outside"),
    Defect("box entirely off the image", _set("boxes", [-90.0, -90.0, -10.0, -10.0]), "boxes", "outside"),
    Defect("unit box beyond 1", _set("boxes", [0.1, 0.1, 1.5, 0.5], coords="unit_xyxy"), "boxes", "outside"),
    Defect("box with NaN", _set("boxes", [math.nan, 1.0, 20.0, 20.0]), "boxes", "finite"),
    Defect("box with infinity", _set("boxes", [1.0, 1.0, math.inf, 20.0]), "boxes", "finite"),
    Defect("box with 3 numbers", _set("boxes", [1.0, 1.0, 20.0]), "boxes", "expected 4 numbers"),
    Defect("reversed box", _set("boxes", [20.0, 20.0, 1.0, 1.0]), "boxes", "no area"),
    Defect("entity of a wrong type", _set("entity", 5), "entity", "expected a string", ("jsonl",)),
    Defect("category of a wrong type", _set("category", ["x"]), "category", "expected a string", ("jsonl",)),
    Defect("boxes of a wrong type", _set("boxes", "north-west corner"), "boxes", "expected numbers", ("jsonl", "csv")),
    Defect("image of a wrong type", _set("image", 12), "image", "expected an image", ("jsonl",)),
    Defect("unknown coordinate system", _set("coords", "pixels"), "coords", "expected one of"),
]


def _records(root: Path) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (root / f"img{i}.png").write_bytes(_png(colour))
        coords, boxes = "pixel_xyxy", [4.0 + i, 5.0, 40.0, 30.0 + i]
        records.append({"image": f"img{i}.png", "entity": f"Entity {i}", "category": "aircraft", "boxes": boxes,
                        "coords": coords, "id": f"id{i}"})
    return records


def _parquet_image(image: Any, root: Path) -> Any:
    """Parquet carries images as a struct: good rows embed their bytes, defects stay as given."""
    if isinstance(image, bytes):
        return {"bytes": image, "path": None}
    if isinstance(image, str) and image.startswith("img"):
        return {"bytes": (root / image).read_bytes(), "path": None}
    return {"bytes": None, "path": image}  # a file defect (corrupt or missing file) stays a path


def _write_annotations(records: list[dict], root: Path, fmt: str) -> Path:
    if fmt == "jsonl":
        path = root / "annotations.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")  # NaN -> NaN literal
    elif fmt == "csv":
        import csv

        path = root / "annotations.csv"
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            for r in records:
                boxes = r["boxes"]
                text = boxes if isinstance(boxes, str) else ",".join(str(v) for v in boxes)  # "nan", "inf"
                writer.writerow({**r, "boxes": text})
    else:
        path = root / "annotations.parquet"
        rows = [{**r, "image": _parquet_image(r["image"], root)} for r in records]
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("defect", ANNOTATION_DEFECTS, ids=lambda d: d.name)
def test_annotation_defect_is_refused_with_file_row_field_and_no_output(tmp_path, capsys, fmt, defect):
    if fmt not in defect.formats:
        pytest.skip(f"{fmt} cannot carry this defect")
    root = tmp_path / "src"
    records = _records(root)
    defect.apply(records, root)
    annotations = _write_annotations(records, root, fmt)
    out = tmp_path / "out" / "train.parquet"

    with pytest.raises(DataError, match=defect.message) as err:
        convert_annotations([annotations], out, ReadOptions(), progress=False)
    _assert_names(err.value, annotations.name, 2, defect.field)
    _no_output(out.parent, out.name)

    status = cli_main(["data", "convert", str(annotations), "--out", str(out), "--no-progress"])
    stderr = capsys.readouterr().err.strip()
    assert status == 2 and len(stderr.splitlines()) == 1, stderr
    assert f"{annotations.name} row 2, field {defect.field!r}" in stderr
    _no_output(out.parent, out.name)

    with pytest.raises(DataError, match=defect.message):
        compose_dataset([annotations], tmp_path / "composed", ComposeConfig(num_images=2, k_weights={2: 1.0}),
                        ReadOptions(), progress=False)
    _no_output(tmp_path / "composed", "grounding.parquet", "probe.parquet")
    record("bad_inputs")


def test_a_parquet_column_of_the_wrong_type_is_refused_at_its_first_row(tmp_path):
    root = tmp_path / "src"
    records = _records(root)
    for i, r in enumerate(records):
        r["entity"] = 100 + i  # the whole column is int64
    annotations = _write_annotations(records, root, "parquet")
    out = tmp_path / "train.parquet"
    with pytest.raises(DataError, match="expected a string") as err:
        convert_annotations([annotations], out, progress=False)
    _assert_names(err.value, annotations.name, 1, "entity")
    _no_output(tmp_path, out.name)
    record("bad_inputs")


def test_a_defect_after_many_good_rows_leaves_no_partial_parquet(tmp_path):
    """Rows are streamed in row groups; a defect at row 600 must still leave no output at all."""
    root = tmp_path / "src"
    good = _records(root)
    records = [dict(good[i % 3], id=f"id{i}") for i in range(600)] + [dict(good[0], boxes=[1.0, 1.0, 999.0, 2.0])]
    annotations = _write_annotations(records, root, "jsonl")
    out = tmp_path / "train.parquet"
    with pytest.raises(DataError) as err:
        convert_annotations([annotations], out, ReadOptions(), progress=False)
    _assert_names(err.value, annotations.name, 601, "boxes")
    _no_output(tmp_path, out.name)
    record("bad_inputs")


def test_a_failed_conversion_leaves_the_previous_output_untouched(tmp_path):
    root = tmp_path / "src"
    records = _records(root)
    annotations = _write_annotations(records, root, "jsonl")
    out = tmp_path / "train.parquet"
    convert_annotations([annotations], out, ReadOptions(), progress=False)
    before = out.read_bytes()
    records[1]["boxes"] = [math.nan, 0.0, 1.0, 1.0]
    _write_annotations(records, root, "jsonl")
    with pytest.raises(DataError):
        convert_annotations([annotations], out, ReadOptions(), progress=False)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "train.parquet"]
    record("bad_inputs")


# ---------------------------------------------------------------------------------------------
# The benchmark (``karl-verl eval``)

ANSWER = "<|object_ref_start|>Entity {i}<|object_ref_end|><|box_start|>(100,120),(600,700)<|box_end|>"


def _bench_rows() -> list[dict]:
    return [{"question_id": f"q{i}", "question": f"Find Entity {i}.", "image": {"bytes": _png(), "path": None},
             "answer": ANSWER.format(i=i), "category": "aircraft"} for i in range(3)]


BENCH_DEFECTS = [
    ("corrupt image bytes", "image", {"bytes": CORRUPT, "path": None}, "image", "cannot decode"),
    ("truncated image bytes", "image", {"bytes": _truncated(), "path": None}, "image", "cannot decode"),
    ("missing image file", "image", {"bytes": None, "path": "no_such.png"}, "image", "not found"),
    ("box outside the grid", "answer", "<|object_ref_start|>E<|object_ref_end|>(100,100),(1200,500)", "answer",
     "0-1000 grid"),
    ("reversed box", "answer", "<|object_ref_start|>E<|object_ref_end|>(600,600),(100,100)", "answer", "0-1000 grid"),
    ("box overflowing to infinity", "answer", f"(1,1),({'9' * 400},5)", "answer", "not finite"),
    ("box with NaN", "answer", "<|object_ref_start|>E<|object_ref_end|>(nan,1),(5,5)", "answer", "no box"),
    ("answer without a box", "answer", "<|object_ref_start|>E<|object_ref_end|>", "answer", "no box"),
    ("empty question", "question", "  ", "question", "non-empty string"),
    ("empty question id", "question_id", "", "question_id", "non-empty"),
    ("duplicate question id", "question_id", "q0", "question_id", "duplicate question id 'q0' \\(first at row 1\\)"),
]


def _write_bench(rows: list[dict], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _predictions(path: Path) -> Path:
    lines = [json.dumps({"question_id": f"q{i}", "response": "<answer>(100,120),(600,700)</answer>"}) for i in range(3)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("name", "column", "value", "field", "message"), BENCH_DEFECTS,
                         ids=[d[0] for d in BENCH_DEFECTS])
def test_bench_defect_is_refused_with_file_row_field_and_no_output(tmp_path, capsys, name, column, value, field,
                                                                   message):
    rows = _bench_rows()
    rows[1][column] = value
    bench = _write_bench(rows, tmp_path / "bench.parquet")
    with pytest.raises(DataError, match=message) as err:
        load_bench(bench, progress=False)
    _assert_names(err.value, "bench.parquet", 2, field)

    out = tmp_path / "report"
    with pytest.raises(DataError):
        run_eval(bench, out, predictions=_predictions(tmp_path / "preds.jsonl"), progress=False)
    assert not out.exists()
    status = cli_main(["eval", "--bench", str(bench), "--predictions", str(tmp_path / "preds.jsonl"),
                       "--out", str(out), "--no-progress"])
    stderr = capsys.readouterr().err.strip()
    assert status == 2 and len(stderr.splitlines()) == 1, stderr
    assert f"bench.parquet row 2, field {field!r}" in stderr
    assert not out.exists()
    record("bad_inputs")


@pytest.mark.parametrize(("column", "values", "message"), [
    ("question_id", [1.5, 2.5, 3.5], "expected a non-empty string or an integer"),
    ("question", [1, 2, 3], "expected a non-empty string"),
    ("category", [1, 2, 3], "expected a category name"),
    ("answer", [1, 2, 3], "expected a string"),
    ("image", [1, 2, 3], "expected an image path"),
])
def test_bench_column_of_the_wrong_type_is_refused_at_its_first_row(tmp_path, column, values, message):
    rows = _bench_rows()
    for row, value in zip(rows, values, strict=True):
        row[column] = value
    bench = _write_bench(rows, tmp_path / "bench.parquet")
    with pytest.raises(DataError, match=message) as err:
        load_bench(bench, progress=False)
    _assert_names(err.value, "bench.parquet", 1, column)
    record("bad_inputs")


def test_bench_missing_column_and_unreadable_file(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "category"} for row in _bench_rows()]
    bench = _write_bench(rows, tmp_path / "bench.parquet")
    with pytest.raises(DataError, match=r"bench.parquet: missing column\(s\) \['category'\]"):
        load_bench(bench, progress=False)
    bench.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bench.parquet: not a readable parquet file"):
        load_bench(bench, progress=False)
    record("bad_inputs", 2)


# ---------------------------------------------------------------------------------------------
# Gaps found while writing these tests (issue 6.5), fixed since: regression tests.


def test_probe_set_with_corrupt_image_is_refused_at_load(tmp_path):
    rows = [{"entity": e, "category": "x", "image": _png()} for e in "abcd"]
    rows[1]["image"] = CORRUPT
    path = tmp_path / "probe.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    # Any row convention: the probe's rows count from 0 where the data toolkit's count from 1.
    with pytest.raises(ProbeError, match=r"probe.parquet: row \d+, field 'image'"):
        load_probe_set(path)


def test_deeply_nested_json_lines_are_refused_with_their_row(tmp_path):
    """``[[[[...`` makes json.loads recurse past Python's limit: still a DataError naming file and row."""
    annotations = tmp_path / "annotations.jsonl"
    annotations.write_text("[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"annotations.jsonl row 1"):
        convert_annotations([annotations], tmp_path / "out.parquet", progress=False)
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({"question_id": "q1", "response": "x"}) + "\n" + "[" * 100_000 + "\n",
                           encoding="utf-8")
    with pytest.raises(DataError, match=r"preds.jsonl row 2"):
        load_predictions(predictions, ["q1"])
    _no_output(tmp_path, "out.parquet")
    record("bad_inputs", 2)


def test_non_utf8_predictions_are_refused_with_their_name(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b'{"question_id": "q1", "response": "ok"}\n{"question_id": "q2", "response": "\xff"}\n')
    with pytest.raises(DataError, match=r"preds.jsonl"):
        load_predictions(path, ["q1", "q2"])
