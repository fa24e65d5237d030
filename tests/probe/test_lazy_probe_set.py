"""A lazily read probe set: no image held until its question is asked; a bad image fails then, naming its row."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from karl_verl.backends.base import BackendError, load_image
from karl_verl.probe.questions import ParquetImage, ProbeError, build_questions, load_probe_set
from karl_verl.probe.runner import run_probe


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def probe_file(tmp_path):
    entities = [f"plane {i}" for i in range(5)]
    rows = {"entity": [], "category": [], "image": []}
    for index in range(20):
        rows["entity"].append(entities[index % 5])
        rows["category"].append("aircraft")
        rows["image"].append({"bytes": b"not an image" if index == 12 else _png((index * 10, 0, 0)), "path": None})
    path = tmp_path / "probe.parquet"
    pq.write_table(pa.table(rows), path, row_group_size=6)  # several row groups
    return path


def test_lazy_items_hold_no_image_and_read_the_same_bytes(probe_file):
    eager_rows = pq.read_table(probe_file).to_pylist()
    with pytest.raises(ProbeError, match="row 13"):  # the eager loader checks every image at once
        load_probe_set(probe_file)
    items = load_probe_set(probe_file, lazy=True)
    assert len(items) == 20 and all(isinstance(item.image, ParquetImage) for item in items)
    for index in (0, 5, 6, 11, 19):  # across row-group boundaries
        assert items[index].image.read() == eager_rows[index]["image"]["bytes"]
        assert load_image(items[index].image).getpixel((0, 0)) == (index * 10, 0, 0)


def test_a_bad_image_fails_when_its_question_is_asked_naming_file_and_row(probe_file):
    items = load_probe_set(probe_file, lazy=True)
    with pytest.raises(BackendError, match=r"probe\.parquet: row 13"):
        load_image(items[12].image)


def test_the_probe_on_a_lazy_set_fails_cleanly_at_the_bad_row(probe_file):
    from karl_verl.backends.hf import HFBackend
    from karl_verl.testing.tiny_qwen3vl import build_tiny_model, build_tiny_processor, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    backend = HFBackend(build_tiny_model(seed=0, tokenizer=tokenizer), build_tiny_processor(tokenizer),
                        batch_size=4, progress=False)
    questions = build_questions(load_probe_set(probe_file, lazy=True), per_entity=4, seed=0)
    with pytest.raises((ProbeError, BackendError), match="row 13"):
        run_probe(questions, backend, mode="choice", progress=False)
    good = [q for q in questions if q.image.index != 12]
    result = run_probe(good, backend, mode="choice", progress=False)
    assert result.num_questions == len(good)
