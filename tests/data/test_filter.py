"""``data filter``: keep 1..k-1 of k correct; from a responses JSONL, a fake generator, or the tiny model."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from karl_verl.backends.base import SamplingSettings, structured_messages
from karl_verl.cli import main
from karl_verl.data.convert import convert_annotations
from karl_verl.data.filter import filter_dataset, read_instances
from karl_verl.data.schema import DataError

K = 4
MISS = "<think>no idea</think><answer>(995,995),(1000,1000)</answer>"


def _hit(box) -> str:
    return f"<think>there</think><answer>({box[0]},{box[1]}),({box[2]},{box[3]})</answer>"


@pytest.fixture
def rl_parquet(single_entity_set, tmp_path):
    path = tmp_path / "rl.parquet"
    convert_annotations([single_entity_set.annotations], path, progress=False)
    return path


def _responses(rl_parquet) -> dict[int, list[str]]:
    """Instance i gets i % 5 correct responses out of 4 (0..4)."""
    out = {}
    for instance in read_instances(rl_parquet):
        correct = instance.index % (K + 1)
        box = [int(v) for v in instance.boxes[0]]
        out[instance.index] = [_hit(box)] * correct + [MISS] * (K - correct)
    return out


def _expected(n: int) -> tuple[int, int, int]:
    counts = [i % (K + 1) for i in range(n)]
    return sum(0 < c < K for c in counts), counts.count(K), counts.count(0)


def test_keeps_one_to_k_minus_one_correct(rl_parquet, tmp_path):
    responses = _responses(rl_parquet)
    path = tmp_path / "responses.jsonl"
    # Mixed line forms: one line with all responses, or one line per response.
    lines = []
    for index, texts in responses.items():
        if index % 2:
            lines.append({"index": index, "responses": texts})
        else:
            lines.extend({"index": index, "response": text} for text in texts)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "kept.parquet"
    summary = filter_dataset(rl_parquet, out, k=K, responses=path, report=tmp_path / "report.json", progress=False)
    kept, trivial, too_hard = _expected(len(responses))
    assert (summary.total, summary.kept, summary.trivial, summary.too_hard) == (len(responses), kept, trivial, too_hard)
    table = pq.read_table(out)
    assert table.schema.equals(pq.read_schema(rl_parquet))
    assert [e["index"] for e in table.column("extra_info").to_pylist()] == [
        i for i in range(len(responses)) if 0 < i % (K + 1) < K]
    text = summary.format()
    assert f"kept {kept} of {len(responses)}" in text and f"dropped {trivial} as trivial" in text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["histogram"] == {str(c): sum(i % (K + 1) == c for i in range(len(responses))) for c in range(K + 1)}


def test_iou_exactly_half_counts_as_correct(rl_parquet, tmp_path):
    [instance, *_] = read_instances(rl_parquet)
    x1, y1, x2, y2 = (int(v) for v in instance.boxes[0])
    assert (y2 - y1) % 2 == 0
    half = _hit((x1, y1, x2, y1 + (y2 - y1) // 2))  # IoU exactly 0.5
    responses = {i.index: [MISS] * K for i in read_instances(rl_parquet)}
    responses[instance.index] = [half, MISS, MISS, MISS]
    summary = filter_dataset(rl_parquet, tmp_path / "kept.parquet", k=K, responses=responses, progress=False)
    assert summary.kept == 1


class ScriptedGenerator:
    """A TextGenerator returning scripted responses in request order (checks what it is given)."""

    def __init__(self, responses: list[list[str]]):
        self.responses = list(responses)
        self.calls: list[SamplingSettings] = []

    def generate(self, requests, sampling):
        self.calls.append(sampling)
        for request in requests:
            structured_messages(request)  # placeholders match images, as a backend checks
            assert len(request.images) == 1 and request.images[0]["bytes"][:4] == b"\x89PNG"
        out, self.responses = self.responses[:len(requests)], self.responses[len(requests):]
        return out


def test_with_a_generator_saves_the_responses(rl_parquet, tmp_path):
    responses = _responses(rl_parquet)
    generator = ScriptedGenerator([responses[i] for i in sorted(responses)])
    out = tmp_path / "kept.parquet"
    summary = filter_dataset(rl_parquet, out, k=K, generator=generator, sampling=SamplingSettings(temperature=1.0),
                             chunk_size=5, progress=False)
    assert summary.kept == _expected(len(responses))[0]
    assert {call.n for call in generator.calls} == {K} and len(generator.calls) == 3  # 14 rows in chunks of 5
    assert summary.responses_path == tmp_path / "kept.responses.jsonl"
    saved = [json.loads(line) for line in summary.responses_path.read_text().splitlines()]
    assert {line["index"]: line["responses"] for line in saved} == responses
    # The saved file feeds a second run without the model.
    again = filter_dataset(rl_parquet, tmp_path / "again.parquet", k=K, responses=summary.responses_path,
                           progress=False)
    assert again.kept == summary.kept


def test_with_the_tiny_model(rl_parquet, tmp_path):
    from karl_verl.generation import load_generator
    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

    generator = load_generator(str(save_tiny_checkpoint(tmp_path / "tiny")), "hf", device="cpu", batch_size=4)
    summary = filter_dataset(rl_parquet, tmp_path / "kept.parquet", k=2, generator=generator,
                             sampling=SamplingSettings(max_new_tokens=4), progress=False)
    # Random weights answer nothing useful: everything is too hard, and the empty output is still valid.
    assert summary.too_hard == summary.total == 14 and summary.kept == 0
    assert pq.read_table(tmp_path / "kept.parquet").num_rows == 0
    assert "nothing kept" in summary.format()


@pytest.mark.parametrize(("lines", "message"), [
    ([{"index": 0, "responses": ["a"] * 3}], "expected 4 responses per instance, got 3 for index 0"),
    ([{"index": 99, "response": "a"}], "row 1, field 'index': 99 is not an instance"),
    ([{"index": "0", "response": "a"}], "field 'index': expected an integer"),
    ([{"index": 0, "responses": "abc"}], "field 'responses': expected a list of strings"),
    ([{"index": 0}], "field 'response'"),
])
def test_bad_responses(rl_parquet, tmp_path, lines, message):
    good = [{"index": i, "responses": texts} for i, texts in _responses(rl_parquet).items() if i != 0]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in lines + good), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        filter_dataset(rl_parquet, tmp_path / "kept.parquet", k=K, responses=path, progress=False)
    assert not (tmp_path / "kept.parquet").exists()


def test_missing_instances_are_an_error(rl_parquet, tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps({"index": 0, "responses": [MISS] * K}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no responses for 13 instance\(s\)"):
        filter_dataset(rl_parquet, tmp_path / "kept.parquet", k=K, responses=path, progress=False)


def test_argument_checks(rl_parquet, tmp_path):
    with pytest.raises(ValueError, match="either responses or a generator"):
        filter_dataset(rl_parquet, tmp_path / "kept.parquet", k=K, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        filter_dataset(rl_parquet, tmp_path / "kept.parquet", k=1, responses={}, progress=False)


def test_cli_filter(rl_parquet, tmp_path, capsys):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"index": i, "responses": texts}) + "\n"
                            for i, texts in _responses(rl_parquet).items()), encoding="utf-8")
    out = tmp_path / "kept.parquet"
    assert main(["data", "filter", str(rl_parquet), "--responses", str(path), "--out", str(out), "-k", "4",
                 "--no-progress"]) == 0
    kept, trivial, too_hard = _expected(14)
    text = capsys.readouterr().out
    assert f"kept {kept} of 14" in text and f"and {too_hard} as too hard" in text
    assert main(["data", "filter", str(rl_parquet), "--responses", str(path), "--out", str(out), "-k", "3",
                 "--no-progress"]) == 2
    assert "expected 3 responses per instance" in capsys.readouterr().err
