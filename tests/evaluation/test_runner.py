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


# ---------------------------------------------------------------------------------------------
# --protocol released


def _full_predictions(tmp_path, kvg):
    lines = [{"question_id": qid, "response": case[3] if case[3] is not None else "<answer>(0,0),(200,200)</answer>"}
             for qid, case in kvg.CASES.items()]
    path = tmp_path / "full.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path, {line["question_id"]: line["response"] for line in lines}


def test_released_protocol_scores_case_for_case_like_the_oracle(bench, tmp_path, kvg):
    import released_evaluator as oracle

    path, responses = _full_predictions(tmp_path, kvg)
    out = tmp_path / "out"
    outcome = run_eval(bench, out, predictions=path, protocol="released", progress=False)
    cases = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    answers = {row["question_id"]: row["answer"] for row in kvg.bench_rows()}
    for case in cases:
        value, correct, _box, pattern = oracle.score(responses[case["question_id"]], answers[case["question_id"]])
        assert (case["iou"], case["correct"], case["pattern"]) == (value, correct, pattern)
    # q4: only the first ground-truth box counts, so the second box's exact hit scores 0.
    assert cases[3]["iou"] == 0.0 and not cases[3]["correct"]
    data = json.loads((out / "metrics.json").read_text())
    assert data["protocol"] == "released" and data["box_format"] is None
    assert (data["seen"]["correct"], data["unseen"]["correct"], data["overall"]["n"]) == (3, 3, 11)
    assert "protocol: released" in outcome.format()
    karl = run_eval(bench, tmp_path / "karl", predictions=path, progress=False)
    assert json.loads((tmp_path / "karl" / "metrics.json").read_text())["protocol"] == "karl"
    assert "protocol: karl" in karl.format() and karl.metrics.seen.correct == 4  # q4 right under ours


def test_chart_title_names_the_protocol(bench, tmp_path, kvg, monkeypatch):
    from karl_verl.evaluation import report

    titles = []
    monkeypatch.setattr(report, "plot_chart", lambda path, rows, columns, title: titles.append(title))
    run_eval(bench, tmp_path / "out", predictions=_full_predictions(tmp_path, kvg)[0], protocol="released",
             progress=False)
    assert titles == ["KVG-Bench Acc@0.5 (%), released protocol"]


def _bench_with(tmp_path, kvg, row_index, **changes):
    rows = kvg.bench_rows()
    rows[row_index].update(changes)
    return kvg.write_bench(tmp_path / "bad.parquet", rows)


@pytest.mark.parametrize("row_index, changes, message", [
    (2, {"answer": "<|object_ref_start|>A3<|object_ref_end|><|box_start|>(0.5,0),(100,100)<|box_end|>"},
     r"question_id 'q3': no integer ground-truth box"),
    (0, {"category": "Aircraft"}, r"question_id 'q1': unknown category 'Aircraft'"),
    (1, {"answer": "<|box_start|>(0,0),(100,50)<|box_end|>"}, r"question_id 'q2': no entity"),
])
def test_released_protocol_stops_on_what_the_original_crashes_on(tmp_path, kvg, row_index, changes, message):
    from karl_verl.data.schema import DataError

    bench = _bench_with(tmp_path, kvg, row_index, **changes)
    predictions = _full_predictions(tmp_path, kvg)[0]
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        run_eval(bench, out, predictions=predictions, protocol="released", progress=False)
    assert not out.exists()
    run_eval(bench, out, predictions=predictions, progress=False)  # ours reads the same case
    assert (out / "metrics.json").exists()


def test_released_protocol_stops_on_a_missing_prediction(bench, predictions, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", "--bench", str(bench), "--predictions", str(predictions), "--out", str(out),
                 "--protocol", "released", "--no-progress"])
    assert code == 2 and not out.exists()
    assert "question_id 'q5': no prediction" in capsys.readouterr().err


def test_released_protocol_stops_before_running_a_model(tmp_path, kvg):
    from karl_verl.data.schema import DataError

    bench = _bench_with(tmp_path, kvg, 0, category="Aircraft")
    calls = []

    class Recording(FixedGenerator):
        def generate(self, requests, sampling):
            calls.append(len(requests))
            return super().generate(requests, sampling)

    with pytest.raises(DataError, match="unknown category"):
        run_eval(bench, tmp_path / "out", generator=Recording("x"), sampling=SamplingSettings(), protocol="released",
                 progress=False)
    assert calls == [] and not (tmp_path / "out").exists()


def test_released_knowledge_split_truncates_like_the_original(tmp_path, kvg):
    # 22 cases of one training entity at a high level, 15 right: int(22 * (15 / 22)) = 14.
    rows = [{"question_id": f"c{i}", "question": "Find <|object_ref_start|>Su-30<|object_ref_end|>",
             "image": {"bytes": kvg.png(), "path": None}, "answer": kvg.answer("Su-30", (0, 0, 100, 100)),
             "category": "aircraft"} for i in range(22)]
    rows.append({**rows[0], "question_id": "d0", "category": "dog", "answer": kvg.answer("Husky", (0, 0, 100, 100))})
    bench = kvg.write_bench(tmp_path / "bench.parquet", rows)
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("".join(
        json.dumps({"question_id": row["question_id"], "response": kvg.think("(0,0),(100,100)" if i < 15 else "none")})
        + "\n" for i, row in enumerate(rows)))
    knowledge = kvg.write_knowledge(tmp_path / "k", ["Su-30"], {"Su-30": "mostly correct"}, {},
                                    {"Husky": "completely incorrect"})
    released_run = run_eval(bench, tmp_path / "r", predictions=predictions, knowledge_dir=knowledge,
                            protocol="released", progress=False)
    high = released_run.metrics.knowledge["high"]
    assert (high.correct, high.n) == (14, 22) and released_run.metrics.knowledge["seen high"].correct == 14
    assert released_run.metrics.knowledge["unseen low"].n == 1
    assert "int(Num * Acc)" in released_run.details
    karl_run = run_eval(bench, tmp_path / "k2", predictions=predictions, knowledge_dir=knowledge, progress=False)
    assert karl_run.metrics.knowledge["high"].correct == 15
    data = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert data["knowledge"]["arithmetic"] == "released" and data["knowledge_dir"] == str(knowledge)
    cases = [json.loads(line) for line in (tmp_path / "r" / "cases.jsonl").read_text().splitlines()]
    assert (cases[0]["knowledge_table"], cases[-1]["knowledge_table"]) == ("train", "testood")


def test_an_entity_missing_from_the_knowledge_tables_stops_the_run(bench, tmp_path, kvg):
    from karl_verl.mastery import MasteryError

    knowledge = kvg.write_knowledge(tmp_path / "k", ["A1"], {"A1": "mostly correct"}, {}, {})
    out = tmp_path / "out"
    with pytest.raises(MasteryError, match=r"question_id 'q2': entity 'A2' is not in this table"):
        run_eval(bench, out, predictions=_full_predictions(tmp_path, kvg)[0], knowledge_dir=knowledge,
                 protocol="released", progress=False)
    assert not out.exists()


def test_released_protocol_rejects_a_single_mastery_table(bench, predictions, mastery, tmp_path):
    with pytest.raises(ValueError, match="knowledge folder"):
        run_eval(bench, tmp_path / "out", predictions=predictions, mastery=mastery, protocol="released",
                 progress=False)


def test_released_protocol_sends_the_released_prompt(bench, tmp_path):
    seen_requests = []

    class Recording(FixedGenerator):
        def generate(self, requests, sampling):
            seen_requests.extend(requests)
            return super().generate(requests, sampling)

    run_eval(bench, tmp_path / "out", generator=Recording("<answer>(0,0),(100,100)</answer>"),
             sampling=SamplingSettings(), protocol="released", progress=False)
    text = seen_requests[0].messages[0]["content"][1]["text"]
    assert text == ("<image>Find and give the bounding box of <|object_ref_start|>A1<|object_ref_end|>  Output the "
                    "thinking process in <think> </think> and final answer (bounding box) in <answer> </answer> tags.")
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["prompt_style"] == "released" and data["protocol"] == "released"


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "0.7"], "--temperature 0.7 (the released inference uses 0.5)"),
    (["--max-new-tokens", "64"], "--max-new-tokens 64"),
    (["--prompt-style", "json"], "--prompt-style json (the released inference uses its own prompt)"),
])
def test_released_protocol_refuses_other_inference_settings(bench, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["eval", "--bench", str(bench), "--model", str(tmp_path / "no-model"), "--out", str(out),
                 "--protocol", "released", "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_released_protocol_has_no_box_format(bench, predictions, tmp_path, capsys):
    assert main(["eval", "--bench", str(bench), "--predictions", str(predictions), "--out", str(tmp_path / "o"),
                 "--protocol", "released", "--box-format", "json", "--no-progress"]) == 2
    assert "--box-format json does not apply" in capsys.readouterr().err
