"""``data convert``: annotations -> verl RL parquet, read back through verl's real RLHFDataset."""

from __future__ import annotations

import sys
import types

import pyarrow.parquet as pq
import pytest

from karl_verl.boxes import entity_of, read_box_reference
from karl_verl.cli import main
from karl_verl.data.annotations import ReadOptions
from karl_verl.data.convert import convert_annotations
from karl_verl.data.schema import DataError


def test_rows_follow_the_rl_schema(single_entity_set, tmp_path):
    out = tmp_path / "rl.parquet"
    summary = convert_annotations([single_entity_set.annotations], out, progress=False)
    rows = pq.read_table(out).to_pylist()
    assert summary.rows == len(rows) == len(single_entity_set.records)
    assert summary.per_category == {"aircraft": 8, "car": 6}
    for index, (row, record) in enumerate(zip(rows, single_entity_set.records, strict=True)):
        entity = record["entity"]
        assert row["data_source"] == f"kvg/{record['category']}"
        [message] = row["prompt"]
        assert message["role"] == "user"
        assert message["content"].count("<image>") == len(row["images"]) == 1
        assert f"<|object_ref_start|>{entity}<|object_ref_end|>" in message["content"]
        assert message["content"].endswith("final answer (bounding box) in <answer> </answer> tags.")
        assert row["images"][0]["bytes"] == (single_entity_set.root / record["image"]).read_bytes()
        truth = row["reward_model"]["ground_truth"]
        assert entity_of(truth) == entity
        extra = row["extra_info"]
        width, height = extra["image_width"], extra["image_height"]
        x1, y1, x2, y2 = record["boxes"]
        expected = tuple(float(round(v)) for v in (x1 / width * 1000, y1 / height * 1000,
                                                   x2 / width * 1000, y2 / height * 1000))
        assert read_box_reference(truth) == pytest.approx(expected, abs=1)
        assert extra == {"entity": entity, "category": record["category"], "image_width": width,
                         "image_height": height, "split": "train", "index": index,
                         "boxes": [[int(v) for v in read_box_reference(truth)]], "source_id": record["id"]}


def _stub_qwen_vl_utils(monkeypatch):
    """qwen_vl_utils imports torchvision at module level, and there is no CPU torchvision here; verl's
    length filter only needs its process_vision_info, which for images is "collect the PIL images"."""

    def process_vision_info(messages, image_patch_size=14, return_video_metadata=False, **kwargs):
        images = [part["image"].convert("RGB") for message in messages if isinstance(message["content"], list)
                  for part in message["content"] if part.get("type") == "image"]
        return images or None, None

    module = types.ModuleType("qwen_vl_utils")
    module.process_vision_info = process_vision_info
    monkeypatch.setitem(sys.modules, "qwen_vl_utils", module)
    return process_vision_info


def test_loads_through_verls_rlhf_dataset_with_a_qwen3_vl_processor(single_entity_set, tmp_path, monkeypatch):
    import datasets
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from karl_verl.testing.tiny_qwen3vl import build_tiny_processor

    process_vision_info = _stub_qwen_vl_utils(monkeypatch)
    # Keep datasets' parquet cache inside the test folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    out = tmp_path / "rl.parquet"
    convert_annotations([single_entity_set.annotations], out, progress=False)
    processor = build_tiny_processor()
    config = OmegaConf.create({
        "prompt_key": "prompt", "image_key": "images", "max_prompt_length": 1024,
        "filter_overlong_prompts": True, "filter_overlong_prompts_workers": 1,
        "cache_dir": str(tmp_path / "verl-cache"),
    })
    dataset = RLHFDataset(str(out), processor.tokenizer, config, processor=processor)
    # verl's length filter drops rows whose processing fails: all rows surviving means all processed.
    assert len(dataset) == len(single_entity_set.records)
    item = dataset[3]
    assert item["data_source"] == "kvg/aircraft"
    assert item["extra_info"]["index"] == item["index"] == 3
    assert item["reward_model"]["ground_truth"].startswith("<|object_ref_start|>")
    content = item["raw_prompt"][0]["content"]
    assert [part["type"] for part in content] == ["image", "text"]
    # What the agent loop does next: chat template + processor over the decoded images.
    text = processor.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
    images, _ = process_vision_info(item["raw_prompt"])
    inputs = processor(text=[text], images=images, return_tensors="pt")
    assert inputs["image_grid_thw"].shape == (1, 3)
    assert text.count("<|vision_start|>") == 1


def test_bad_row_leaves_no_output(single_entity_set, jsonl, tmp_path):
    records = [dict(r) for r in single_entity_set.records]
    records[11]["boxes"] = [1, 2, 3]  # rows before it are fine and already written to the temporary file
    bad = jsonl(single_entity_set.root / "annotations_bad.jsonl", records)
    out = tmp_path / "rl.parquet"
    out.write_bytes(b"previous")
    with pytest.raises(DataError, match=r"annotations_bad.jsonl row 12, field 'boxes': expected 4 numbers"):
        convert_annotations([bad], out, progress=False)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rl.parquet", "src"]


def test_several_boxes_keep_all_in_extra_info(single_entity_set, jsonl, tmp_path):
    record = dict(single_entity_set.records[0], boxes=[[0, 0, 9, 6], [45, 30, 90, 60]])
    path = jsonl(single_entity_set.root / "multi.jsonl", [record])
    summary = convert_annotations([path], tmp_path / "rl.parquet", progress=False)
    [row] = pq.read_table(tmp_path / "rl.parquet").to_pylist()
    assert summary.multi_box_rows == 1 and "several boxes" in summary.format()
    assert row["extra_info"]["boxes"] == [[0, 0, 100, 100], [500, 500, 1000, 1000]]
    assert row["reward_model"]["ground_truth"].endswith("<|box_start|>(0,0),(100,100)<|box_end|>")


def test_output_must_be_parquet_and_inputs_non_empty(single_entity_set, tmp_path, jsonl):
    with pytest.raises(ValueError, match=r"\.parquet"):
        convert_annotations([single_entity_set.annotations], tmp_path / "rl.json", progress=False)
    with pytest.raises(ValueError, match="no annotation records"):
        convert_annotations([jsonl(tmp_path / "empty.jsonl", [])], tmp_path / "rl.parquet", progress=False)
    assert not (tmp_path / "rl.parquet").exists()


def test_cli_convert(single_entity_set, tmp_path, capsys):
    out = tmp_path / "rl.parquet"
    assert main(["data", "convert", str(single_entity_set.annotations), "--out", str(out), "--split", "val",
                 "--no-progress"]) == 0
    assert f"wrote 14 rows to {out}" in capsys.readouterr().out
    assert {row["split"] for row in pq.read_table(out).column("extra_info").to_pylist()} == {"val"}


def test_cli_convert_labels_rows_with_the_hf_split(tmp_path, make_image, capsys):
    datasets = pytest.importorskip("datasets")
    data = make_image((30, 20), (0, 0, 15, 10), (0, 200, 0), "PNG")
    rows = {"image": [{"bytes": data, "path": None}], "entity": ["Cessna 172"], "category": ["aircraft"],
            "boxes": [[0, 0, 15, 10]]}
    features = datasets.Features({"image": datasets.Image(), "entity": datasets.Value("string"),
                                  "category": datasets.Value("string"),
                                  "boxes": datasets.Sequence(datasets.Value("float32"))})
    splits = {name: datasets.Dataset.from_dict(rows, features=features) for name in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "rl.parquet"
    assert main(["data", "convert", str(tmp_path / "hf"), "--hf-split", "test", "--coords", "pixel_xyxy",
                 "--out", str(out), "--no-progress"]) == 0
    assert [row["split"] for row in pq.read_table(out).column("extra_info").to_pylist()] == ["test"]


def test_cli_convert_reports_bad_input(tmp_path, jsonl, capsys):
    path = jsonl(tmp_path / "annotations.jsonl", [{"image": "x.png", "entity": "E", "category": "car",
                                                    "boxes": [0, 0, 1, 1]}])
    assert main(["data", "convert", str(path), "--out", str(tmp_path / "rl.parquet"), "--coords", "pixel_xyxy",
                 "--no-progress"]) == 2
    assert "annotations.jsonl row 1, field 'image': image file not found" in capsys.readouterr().err
    assert not (tmp_path / "rl.parquet").exists()


def test_read_options_pass_through(single_entity_set, tmp_path, jsonl):
    records = [{k: v for k, v in r.items() if k not in ("coords",)} for r in single_entity_set.records[:2]]
    path = jsonl(single_entity_set.root / "nocoords.jsonl", records)
    summary = convert_annotations([path], tmp_path / "rl.parquet", ReadOptions(coords="pixel_xyxy", split="test"),
                                  progress=False)
    assert summary.per_split == {"test": 2}


def test_cli_convert_missing_input(tmp_path, capsys):
    assert main(["data", "convert", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "rl.parquet"),
                 "--no-progress"]) == 2
    assert "nope.jsonl: annotation file not found" in capsys.readouterr().err
