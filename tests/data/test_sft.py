"""``karl-verl data sft-convert``: sharegpt CoT-SFT files -> the parquet verl's MultiTurnSFTDataset reads."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from karl_verl.cli import main
from karl_verl.data.sft import IMAGE_MAX_PIXELS, SftDataProblems, check_assistant_answer, convert_sharegpt

ANSWER = "<think>The twin tail and swept wings mark the Su-30.</think><answer>(100,200),(500,700)</answer>"
QUESTION = "<image>Find and give the bounding box of <|object_ref_start|>Sukhoi Su-30<|object_ref_end|>"


def write_image(path: Path, size=(80, 60), colour=(200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def messages_record(image="img/a.png", answer=ANSWER, question=QUESTION):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": [image] if image is not None else []}


@pytest.fixture
def released_layout(tmp_path):
    """The released layout: cot-sft-*.json beside an unzipped images/ folder with relative paths."""
    images = tmp_path / "images"
    write_image(images / "img/a.png")
    write_image(images / "img/b.png", size=(64, 96), colour=(30, 30, 200))
    data = tmp_path / "cot-sft-aircraft-72B.json"
    data.write_text(json.dumps([messages_record(), messages_record("img/b.png")]), encoding="utf-8")
    return tmp_path, data, images


@pytest.mark.parametrize("embed", [True, False])
def test_released_layout_is_read_by_verls_sft_dataset(released_layout, fetch_image_calls, sft_dataset, embed):
    root, data, images = released_layout
    out = root / "sft.parquet"
    summary = convert_sharegpt([data], out, images_dir=images, embed_images=embed, progress=False)
    assert summary.rows == 2 and summary.images == 2 and not summary.skipped

    rows = pq.read_table(out).to_pylist()
    assert rows[0]["messages"] == messages_record()["messages"]
    assert rows[1]["extra_info"]["row"] == 2 and rows[1]["extra_info"]["index"] == 1
    image = rows[0]["images"][0]
    assert image["max_pixels"] == IMAGE_MAX_PIXELS
    if embed:
        assert set(image) == {"bytes", "max_pixels"} and image["bytes"] == (images / "img/a.png").read_bytes()
    else:
        assert set(image) == {"image", "max_pixels"} and image["image"] == str((images / "img/a.png").resolve())

    dataset, tokenizer = sft_dataset(out)
    assert len(dataset) == 2
    for index in range(2):
        item = dataset[index]
        trained = tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
        assert trained == ANSWER + "<|im_end|>\n"  # the loss covers the assistant turn only
        assert item["multi_modal_inputs"]["image_grid_thw"].shape == (1, 3)
    assert [call["max_pixels"] for call in fetch_image_calls] == [IMAGE_MAX_PIXELS] * 2


def test_conversations_spelling_and_system_prompt(tmp_path):
    write_image(tmp_path / "a.png")
    record = {"system": "You are a careful annotator.",
              "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}],
              "images": ["a.png"]}
    data = tmp_path / "cot.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    convert_sharegpt([data], tmp_path / "sft.parquet", progress=False)
    (row,) = pq.read_table(tmp_path / "sft.parquet").to_pylist()
    assert row["messages"] == [{"role": "system", "content": "You are a careful annotator."},
                               {"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]


def test_multi_turn_rows_are_checked_turn_by_turn(tmp_path):
    write_image(tmp_path / "a.png")
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER},
                           {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "no"}],
              "images": ["a.png"]}
    data = tmp_path / "cot.json"
    data.write_text(json.dumps([record]), encoding="utf-8")
    with pytest.raises(SftDataProblems) as info:
        convert_sharegpt([data], tmp_path / "sft.parquet", progress=False)
    assert "cot.json row 1, field 'messages[3].content'" in str(info.value)


BAD_ROWS = [
    (messages_record(image=None), "images", "1 <image> placeholder(s) but 0 image(s)"),
    (messages_record(image="img/missing.png"), "images[0]", "image file not found"),
    (messages_record(image="img/broken.png"), "images[0]", "cannot decode"),
    (messages_record(answer="(100,200),(500,700)"), "messages[1].content", "<think>...</think>"),
    (messages_record(answer="<think>x</think><answer>the left one</answer>"), "messages[1].content", "no (x1,y1)"),
    ({"messages": [{"role": "assistant", "content": ANSWER}], "images": []}, "messages[0].content",
     "expected role 'user'"),
    ({"messages": [{"role": "user", "content": QUESTION}], "images": ["img/a.png"]}, "messages[0].content",
     "last turn must be the assistant's"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "expected one of"),
    ({"conversations": [], "images": []}, "conversations", "non-empty list"),
    ({"text": "no turns"}, None, "expected a 'messages'"),
    ({"messages": [{"role": "user", "content": "<video>x"}, {"role": "assistant", "content": ANSWER}]},
     "messages[0].content", "<video>"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ANSWER + "<image>"}],
      "images": ["img/a.png"]}, "messages[1].content", "placeholder in a assistant turn"),
]


@pytest.mark.parametrize(("record", "field", "message"), BAD_ROWS)
def test_bad_rows_name_file_row_and_field_and_nothing_is_written(released_layout, record, field, message):
    root, data, images = released_layout
    (images / "img/broken.png").write_bytes(b"not an image")
    data.write_text(json.dumps([messages_record(), record]), encoding="utf-8")
    out = root / "sft.parquet"
    with pytest.raises(SftDataProblems) as info:
        convert_sharegpt([data], out, images_dir=images, progress=False)
    (problem,) = info.value.problems
    assert (problem.source, problem.row, problem.field) == ("cot-sft-aircraft-72B.json", 2, field)
    assert message in problem.message
    assert not out.exists() and list(root.glob(".sft.parquet*")) == []


def test_skip_bad_drops_bad_rows_and_says_how_many(released_layout):
    root, data, images = released_layout
    records = [messages_record(), messages_record(image="img/missing.png"), messages_record(answer="no format"),
               messages_record("img/b.png")]
    data.write_text(json.dumps(records), encoding="utf-8")
    summary = convert_sharegpt([data], root / "sft.parquet", images_dir=images, skip_bad=True, progress=False)
    assert summary.rows == 2 and [p.row for p in summary.skipped] == [2, 3]
    assert "skipped 2 bad rows" in summary.format()
    assert [r["extra_info"]["row"] for r in pq.read_table(root / "sft.parquet").to_pylist()] == [1, 4]


def test_unreadable_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "b.json").write_text('{"messages": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="a.json: invalid JSON"):
        convert_sharegpt([tmp_path / "a.json"], tmp_path / "o.parquet", progress=False)
    with pytest.raises(ValueError, match="b.json: expected a JSON array"):
        convert_sharegpt([tmp_path / "b.json"], tmp_path / "o.parquet", progress=False)
    with pytest.raises(ValueError, match="must end in .parquet"):
        convert_sharegpt([tmp_path / "b.json"], tmp_path / "o.json", progress=False)


def test_answer_format_check():
    assert check_assistant_answer(ANSWER) is None
    assert check_assistant_answer("<think>a</think>\n<answer>[1, 2, 3, 4]</answer>") is not None  # not the pair form
    assert check_assistant_answer(" " + ANSWER) is not None  # must start at the first character


def test_command_line(released_layout, capsys):
    root, data, images = released_layout
    out = root / "sft.parquet"
    assert main(["data", "sft-convert", str(data), "--images-dir", str(images), "--out", str(out),
                 "--no-progress"]) == 0
    assert "wrote 2 rows (2 images, embedded)" in capsys.readouterr().out

    data.write_text(json.dumps([messages_record(), messages_record(image="img/missing.png")]), encoding="utf-8")
    out.unlink()
    assert main(["data", "sft-convert", str(data), "--images-dir", str(images), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 rows have problems" in err and "row 2, field 'images[0]'" in err and not out.exists()
    assert main(["data", "sft-convert", str(data), "--images-dir", str(images), "--out", str(out), "--skip-bad",
                 "--image-paths", "--max-pixels", "1024", "--no-progress"]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().out
    (row,) = pq.read_table(out).to_pylist()
    assert row["images"] == [{"image": str((images / "img/a.png").resolve()), "max_pixels": 1024}]
