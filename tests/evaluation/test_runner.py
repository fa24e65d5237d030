"""``karl-verl eval`` end to end: predictions file, a fake generator, the tiny model, and the CLI."""

from __future__ import annotations

import json

import pytest

from karl_verl.backends.base import SamplingSettings
from karl_verl.cli import main
from karl_verl.evaluation.runner import run_eval


def test_predictions_give_the_hand_computed_figures(bench, predictions, mastery, tmp_path):
    out = tmp_path / "out"
    outcome = run_eval(bench, out, predictions=predictions, mastery=mastery, name="mine", progress=False)
    data = json.loads((out / "metrics.json").read_text())
    assert (data["seen"]["acc"], data["unseen"]["acc"]) == (0.5, 0.6)
    assert data["overall"]["acc"] == pytest.approx(6 / 11)
    assert (data["overall"]["missing"], data["overall"]["unparseable"], data["unknown_predictions"]) == (1, 1, 1)
    assert data["knowledge"]["high"]["acc"] == 0.8 and data["knowledge"]["low"]["acc"] == 0.4
    assert data["knowledge"]["not_in_table"] == 1
    cases = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [c["question_id"] for c in cases] == [f"q{i}" for i in range(1, 12)]
    assert cases[4] == {"question_id": "q5", "category": "car", "entity": "C2", "iou": 0.0, "correct": False,
                        "parsed": False, "missing": True, "pred_box": None, "knowledge_level": 3,
                        "knowledge_table": None, "pattern": None}
    assert (out / "kvg_bench.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "predictions.jsonl").exists()
    text = outcome.format()
    assert "mine  " in text and "54.55" in text and "1 without a prediction, 1 unparseable" in text


class FixedGenerator:
    def __init__(self, text: str):
        self.text = text

    def generate(self, requests, sampling):
        return [[self.text] * sampling.n for _ in requests]


def test_generator_predictions_are_saved_and_scored(bench, tmp_path):
    out = tmp_path / "out"
    run_eval(bench, out, generator=FixedGenerator("<answer>(0,0),(100,100)</answer>"),
             sampling=SamplingSettings(), chunk_size=5, progress=False)
    saved = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(saved) == 11 and saved[0] == {"question_id": "q1", "response": "<answer>(0,0),(100,100)</answer>"}
    data = json.loads((out / "metrics.json").read_text())
    # The square is right for every case whose ground truth is (0,0),(100,100): q1-q4, q6, q9-q11.
    assert data["overall"]["correct"] == 8 and data["overall"]["missing"] == 0
    assert data["sampling"] == {"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 4096, "seed": 20, "n": 1}
    # The saved predictions evaluate to the same figures.
    run_eval(bench, tmp_path / "again", predictions=out / "predictions.jsonl", progress=False)
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["overall"] == data["overall"]


def test_argument_checks(bench, predictions, tmp_path):
    with pytest.raises(ValueError, match="either predictions or a generator"):
        run_eval(bench, tmp_path, progress=False)
    with pytest.raises(ValueError, match="both seen and unseen"):
        run_eval(bench, tmp_path, predictions=predictions, seen_categories=["dog"], progress=False)


def test_bad_mastery_table_fails_before_inference(bench, tmp_path):
    (tmp_path / "m.json").write_text('{"A1": {"knowledge_category": "somewhat"}}', encoding="utf-8")

    class Exploding:
        def generate(self, requests, sampling):
            raise AssertionError("inference must not start")

    from karl_verl.mastery import MasteryError

    with pytest.raises(MasteryError, match="A1"):
        run_eval(bench, tmp_path / "out", generator=Exploding(), mastery=tmp_path / "m.json", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_with_predictions(bench, predictions, mastery, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--bench", str(bench), "--predictions", str(predictions), "--out", str(out),
                 "--mastery", str(mastery), "--name", "ours", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("KVG-Bench Acc@0.5 (%)")
    assert "KARL (paper)" in text and "Qwen3-VL-8B (paper)" in text and "high knowledge (1-3)" in text
    assert json.loads((out / "metrics.json").read_text())["name"] == "ours"


def test_cli_custom_split_and_box_format(bench, predictions, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--bench", str(bench), "--predictions", str(predictions), "--out", str(out),
                 "--seen", "aircraft,car", "--unseen", "dog", "--box-format", "json", "--paper-rows", "",
                 "--no-progress"]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["seen"]["n"] == 5 and data["unseen"]["n"] == 2 and data["other_categories"] == [
        "bird", "flower", "landmark"]
    assert data["overall"]["correct"] == 1  # only q8 answers in JSON
    assert "(paper)" not in capsys.readouterr().out


def test_cli_reports_bad_input(tmp_path, kvg, predictions, capsys):
    rows = kvg.bench_rows()
    rows[2]["question_id"] = "q1"
    bench = kvg.write_bench(tmp_path / "dup.parquet", rows)
    assert main(["eval", "--bench", str(bench), "--predictions", str(predictions), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "dup.parquet row 3, field 'question_id': duplicate question id 'q1'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_with_the_tiny_model(bench, tmp_path, capsys):
    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    assert main(["eval", "--bench", str(bench), "--model", str(model), "--out", str(out), "--device", "cpu",
                 "--max-new-tokens", "4", "--batch-size", "6", "--no-progress"]) == 0
    saved = (out / "predictions.jsonl").read_text().splitlines()
    assert len(saved) == 11
    data = json.loads((out / "metrics.json").read_text())
    assert data["model"] == str(model) and data["backend"] == "hf" and data["overall"]["n"] == 11
    assert data["sampling"]["max_new_tokens"] == 4
    assert "predictions saved to" in capsys.readouterr().out


def test_cli_abs_pixels_for_qwen25_boxes(bench, predictions, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--bench", str(bench), "--predictions", str(predictions), "--out", str(out),
                 "--box-format", "qwen25_vl_abs", "--abs-pixels", "3136,1003520", "--no-progress"]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["abs_pixels"] == [3136, 1003520] and data["box_format"] == "qwen25_vl_abs"
    with pytest.raises(SystemExit):
        main(["eval", "--bench", str(bench), "--predictions", str(predictions), "--out", str(out),
              "--abs-pixels", "5"])
    assert "--abs-pixels" in capsys.readouterr().err
