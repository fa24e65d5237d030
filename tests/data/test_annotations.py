"""Reading annotation files: JSONL, CSV, parquet and datasets folders, and their errors."""

from __future__ import annotations

import base64
import json

import pytest

from karl_verl.data.annotations import ReadOptions, iter_annotations, parse_field_map
from karl_verl.data.schema import DataError


def test_jsonl_with_relative_paths(single_entity_set):
    annotations = list(iter_annotations(single_entity_set.annotations))
    assert len(annotations) == len(single_entity_set.records)
    first, record = annotations[0], single_entity_set.records[0]
    assert (first.entity, first.category, first.split) == (record["entity"], record["category"], "train")
    assert first.id == "0-0"
    assert first.boxes == (tuple(float(v) for v in record["boxes"]),)
    assert (first.width, first.height) == (90, 60)
    assert str(first.where) == "annotations.jsonl:1"


def test_csv_with_corner_columns_and_file_level_coords(tmp_path, make_image):
    (tmp_path / "a.png").write_bytes(make_image((100, 50), (10, 10, 50, 40), (255, 0, 0)))
    (tmp_path / "ann.csv").write_text(
        "image,entity,category,x1,y1,x2,y2\n"
        "a.png,Fiat 500,car,0.1,0.2,0.5,0.8\n", encoding="utf-8")
    [annotation] = iter_annotations(tmp_path / "ann.csv", ReadOptions(coords="unit_xyxy", split="val"))
    assert annotation.boxes == ((10.0, 10.0, 50.0, 40.0),)
    assert annotation.split == "val"


def test_parquet_with_image_bytes_and_field_map(tmp_path, make_image):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = make_image((40, 40), (0, 0, 20, 20), (0, 0, 255))
    pq.write_table(pa.Table.from_pylist([{"img": {"bytes": data, "path": None}, "label": "Mini Cooper",
                                          "category": "car", "bbox": [0, 0, 20, 20]}]), tmp_path / "ann.parquet")
    options = ReadOptions(coords="pixel_xyxy", field_map=parse_field_map(["image=img", "entity=label"]))
    [annotation] = iter_annotations(tmp_path / "ann.parquet", options)
    assert annotation.entity == "Mini Cooper"
    assert annotation.image.read() == data


def test_datasets_folder_with_image_feature(tmp_path, make_image):
    datasets = pytest.importorskip("datasets")
    data = make_image((30, 20), (0, 0, 15, 10), (0, 200, 0), "JPEG")
    features = datasets.Features({"image": datasets.Image(), "entity": datasets.Value("string"),
                                  "category": datasets.Value("string"),
                                  "boxes": datasets.Sequence(datasets.Value("float32"))})
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None}], "entity": ["Cessna 172"],
                                          "category": ["aircraft"], "boxes": [[0, 0, 15, 10]]}, features=features)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "hf"))
    [annotation] = iter_annotations(tmp_path / "hf", ReadOptions(coords="pixel_xyxy"))
    # The encoded bytes are kept as they were: no decode and re-encode of the JPEG.
    assert annotation.image.read() == data
    assert str(annotation.where) == "hf[train]:1"


def test_base64_is_not_mistaken_for_a_path(tmp_path):
    # A string is a path: a base64 blob gives a clear "not found" error, not a crash.
    record = {"image": base64.b64encode(b"abc").decode(), "entity": "E", "category": "car", "boxes": [0, 0, 1, 1],
              "coords": "pixel_xyxy"}
    (tmp_path / "a.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="a.jsonl row 1, field 'image': image file not found"):
        list(iter_annotations(tmp_path / "a.jsonl"))


@pytest.mark.parametrize(("change", "message"), [
    ({"image": "missing.png"}, "row 2, field 'image': image file not found"),
    ({"entity": ""}, "row 2, field 'entity': empty string"),
    ({"entity": 5}, "row 2, field 'entity': expected a string, got int 5"),
    ({"category": None}, "row 2, field 'category': missing"),
    ({"boxes": [1, 2, 3]}, r"row 2, field 'boxes': expected 4 numbers, got \[1, 2, 3\]"),
    ({"boxes": [0, 0, 500, 20]}, "row 2, field 'boxes': .*outside"),
    ({"boxes": None}, "row 2, field 'boxes': missing"),
    ({"coords": "polar"}, "row 2, field 'coords': expected one of"),
    ({"entity": "Su-30 <image>"}, "row 2, field 'entity': contains '<image>', which the prompt format reserves"),
    ({"category": "<|object_ref_end|>car"}, r"row 2, field 'category': contains '<\|object_ref_end\|>'"),
])
def test_bad_rows_name_file_row_and_field(single_entity_set, jsonl, change, message):
    records = [dict(r) for r in single_entity_set.records[:3]]
    records[1].update(change)
    path = jsonl(single_entity_set.root / "bad.jsonl", records)
    with pytest.raises(DataError, match=f"bad.jsonl {message}"):
        list(iter_annotations(path))


def test_corrupt_image_bytes_and_invalid_json(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "a.jsonl").write_text(
        '{"image": "broken.png", "entity": "E", "category": "c", "boxes": [0, 0, 1, 1], "coords": "pixel_xyxy"}\n'
        "{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match="a.jsonl row 1, field 'image': cannot decode image file"):
        list(iter_annotations(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text("\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match="b.jsonl row 2: invalid JSON"):
        list(iter_annotations(tmp_path / "b.jsonl"))


def test_coords_required_somewhere(single_entity_set, jsonl):
    records = [{k: v for k, v in r.items() if k != "coords"} for r in single_entity_set.records[:1]]
    path = jsonl(single_entity_set.root / "nocoords.jsonl", records)
    with pytest.raises(DataError, match="row 1, field 'coords': missing"):
        list(iter_annotations(path))
    assert len(list(iter_annotations(path, ReadOptions(coords="pixel_xyxy")))) == 1


def test_options_are_checked():
    with pytest.raises(ValueError, match="coords"):
        ReadOptions(coords="nope")
    with pytest.raises(ValueError, match="unknown field"):
        ReadOptions(field_map={"colour": "c"})
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        parse_field_map(["entity"])


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported annotation file"):
        list(iter_annotations(tmp_path / "a.txt"))
    with pytest.raises(DataError, match="not found"):
        list(iter_annotations(tmp_path / "none.jsonl"))


def test_unreadable_files(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"entity": "Citro\xebn"}\n'.encode("latin-1"))
    # JSONL lines are decoded one by one, so the error names the line.
    with pytest.raises(DataError, match="latin.jsonl row 1: not UTF-8 text"):
        list(iter_annotations(tmp_path / "latin.jsonl"))
    (tmp_path / "latin.csv").write_bytes('entity\nCitro\xebn\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.csv: not UTF-8 text"):
        list(iter_annotations(tmp_path / "latin.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nothing")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        list(iter_annotations(tmp_path / "bad.parquet"))
