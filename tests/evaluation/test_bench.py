"""Reading KVG-Bench and predictions: the released format, several boxes, and clear errors."""

from __future__ import annotations

import json

import pytest

from karl_verl.backends.base import SamplingSettings, structured_messages
from karl_verl.data.schema import DataError
from karl_verl.evaluation.bench import bench_requests, load_bench, load_predictions, predict


def test_reads_the_released_format(bench, kvg):
    cases = load_bench(bench, progress=False)
    assert [c.question_id for c in cases] == list(kvg.CASES)
    q4 = cases[3]
    assert (q4.category, q4.entity, q4.row) == ("car", "C1", 4)
    assert q4.boxes == ((0, 0, 100, 100), (500, 500, 600, 600))
    assert (q4.width, q4.height) == (280, 280)


def test_integer_ids_list_answers_and_image_paths(tmp_path, kvg):
    (tmp_path / "img.png").write_bytes(kvg.png((50, 40)))
    rows = [{"question_id": 7, "question": "<image>Find X", "image": {"bytes": None, "path": "img.png"},
             "answer": [kvg.answer("X", (1, 2, 3, 4)), kvg.answer("X", (5, 6, 7, 8))], "category": " Dog "}]
    [case] = load_bench(kvg.write_bench(tmp_path / "b.parquet", rows), progress=False)
    assert (case.question_id, case.category, case.entity, case.width) == ("7", "dog", "X", 50)
    assert case.boxes == ((1, 2, 3, 4), (5, 6, 7, 8))


def _bad(kvg, row: int, **change) -> list[dict]:
    rows = kvg.bench_rows()
    rows[row - 1].update(change)
    return rows


@pytest.mark.parametrize(("row", "change", "message"), [
    (3, {"question_id": "q1"}, "row 3, field 'question_id': duplicate question id 'q1' \\(first at row 1\\)"),
    (2, {"image": {"bytes": b"\x89PNG broken", "path": None}}, "row 2, field 'image': cannot decode image bytes"),
    (2, {"image": {"bytes": None, "path": "nowhere.png"}}, "row 2, field 'image': image file not found"),
    (5, {"answer": "<|object_ref_start|>X<|object_ref_end|>"}, "row 5, field 'answer': no box"),
    (5, {"answer": "(0,0),(1200,10)"}, "row 5, field 'answer': .*not an ordered box on the 0-1000 grid"),
    (5, {"answer": "(50,0),(10,10)"}, "row 5, field .answer.: box .50.0, 0.0, 10.0, 10.0. is not an ordered box"),
    (6, {"category": ""}, "row 6, field 'category'"),
    (6, {"question": ""}, "row 6, field 'question'"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, kvg, row, change, message):
    path = kvg.write_bench(tmp_path / "bench.parquet", _bad(kvg, row, **change))
    with pytest.raises(DataError, match=f"bench.parquet {message}"):
        load_bench(path, progress=False)


def test_wrong_column_types_and_missing_columns(tmp_path, kvg):
    rows = kvg.bench_rows()
    for row in rows:
        row["answer"] = 12
    with pytest.raises(DataError, match="row 1, field 'answer': expected a string"):
        load_bench(kvg.write_bench(tmp_path / "b.parquet", rows), progress=False)
    rows = [{k: v for k, v in row.items() if k != "category"} for row in kvg.bench_rows()]
    with pytest.raises(DataError, match=r"missing column\(s\) \['category'\]"):
        load_bench(kvg.write_bench(tmp_path / "c.parquet", rows), progress=False)
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_bench(tmp_path / "d.parquet", progress=False)


def test_predictions(predictions, bench):
    cases = load_bench(bench, progress=False)
    loaded = load_predictions(predictions, [c.question_id for c in cases])
    assert set(loaded.responses) == {f"q{i}" for i in range(1, 12)} - {"q5"}
    assert loaded.unknown_ids == ["not-in-bench"]


@pytest.mark.parametrize(("lines", "message"), [
    (['{"question_id": "q1", "response": "a"}', '{"question_id": "q1", "response": "b"}'],
     "row 2, field 'question_id': second prediction for 'q1' \\(first at line 1\\)"),
    (['{"question_id": "q1", "response": 3}'], "row 1, field 'response'"),
    (['{"response": "a"}'], "row 1, field 'question_id'"),
    (["[1, 2]"], "row 1: expected a JSON object"),
    (["{oops"], "row 1: invalid JSON"),
])
def test_bad_predictions(tmp_path, lines, message):
    path = tmp_path / "pred.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"pred.jsonl {message}"):
        load_predictions(path, ["q1"])


def test_requests_carry_one_image_and_the_karl_prompt(bench):
    cases = load_bench(bench, progress=False)
    requests = bench_requests(cases)
    [message] = requests[0].messages
    assert message["content"].startswith("<image>Find and give the bounding box of <|object_ref_start|>A1")
    assert message["content"].endswith("in <answer> </answer> tags.")
    assert requests[0].images == [cases[0].image]
    structured_messages(requests[0])  # the backends' placeholder check passes
    assert bench_requests(cases, "json")[0].messages[0]["content"].endswith("using JSON format.")


class EchoGenerator:
    """Answers every request with the same text; records the sampling settings and chunk sizes."""

    def __init__(self):
        self.chunks: list[int] = []
        self.sampling: list[SamplingSettings] = []

    def generate(self, requests, sampling):
        self.chunks.append(len(requests))
        self.sampling.append(sampling)
        return [["<answer>(0,0),(100,100)</answer>"] * sampling.n for _ in requests]


def test_predict_in_chunks(bench):
    cases = load_bench(bench, progress=False)
    generator = EchoGenerator()
    responses = predict(cases, generator, SamplingSettings(), chunk_size=4, progress=False)
    assert generator.chunks == [4, 4, 3]
    assert set(responses) == {c.question_id for c in cases}
    assert generator.sampling[0] == SamplingSettings(temperature=0.5, top_p=1.0, max_new_tokens=4096, seed=20, n=1)


def test_predict_rejects_a_generator_returning_the_wrong_count(bench):
    from karl_verl.backends.base import BackendError

    class Short:
        def generate(self, requests, sampling):
            return [["x"]] * (len(requests) - 1)

    with pytest.raises(BackendError, match="expected 11 answer lists, got 10"):
        predict(load_bench(bench, progress=False), Short(), SamplingSettings(), progress=False)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="benchmark file not found"):
        load_bench(tmp_path / "none.parquet", progress=False)
    with pytest.raises(DataError, match="predictions file not found"):
        load_predictions(tmp_path / "none.jsonl", [])
    (tmp_path / "x.jsonl").write_text(json.dumps({"question_id": 1, "response": "a"}) + "\n", encoding="utf-8")
    assert load_predictions(tmp_path / "x.jsonl", ["1"]).responses == {"1": "a"}


def test_the_exact_prompt_of_a_benchmark_row_in_each_protocol(bench):
    from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

    [case] = load_bench(bench, progress=False)[:1]
    query = "Find and give the bounding box of <|object_ref_start|>A1<|object_ref_end|>"
    suffix = ("Output the thinking process in <think> </think> and final answer (bounding box) in "
              "<answer> </answer> tags.")
    assert case.question == query  # the row carries no <image>
    karl = structured_messages(bench_requests([case], protocol="karl")[0])
    released = structured_messages(bench_requests([case], protocol="released")[0])
    # Ours: the <image> placeholder becomes the image part and leaves the text.
    assert karl == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{query}  {suffix}"}]}]
    # Released: the literal text <image> stays in the text part, beside the image part.
    assert released == [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": f"<image>{query}  {suffix}"}]}]
    template = build_tiny_tokenizer().apply_chat_template
    rendered = [template(m, tokenize=False, add_generation_prompt=True) for m in (karl, released)]
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert f"{vision}{query}  {suffix}" in rendered[0]
    assert f"{vision}<image>{query}  {suffix}" in rendered[1]


def test_released_reading_keeps_the_answer_as_written(tmp_path, kvg):
    rows = [{"question_id": "r1", "question": "Find X", "image": {"bytes": kvg.png(), "path": None},
             "answer": "<|object_ref_start|> X <|object_ref_end|><|box_start|>(900,900),(100,1200)<|box_end|>"
                       "<|box_start|>(1,2),(3,4)<|box_end|>", "category": "dog"}]
    path = kvg.write_bench(tmp_path / "b.parquet", rows)
    [case] = load_bench(path, progress=False, protocol="released")
    # Reversed and off-grid boxes are kept (the original scores them as they are); one box only.
    assert (case.entity, case.boxes, case.category) == (" X ", ((900.0, 900.0, 100.0, 1200.0),), "dog")
    with pytest.raises(DataError, match="ordered box"):
        load_bench(path, progress=False)
