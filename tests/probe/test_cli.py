"""``karl-verl probe`` end to end on a tiny checkpoint and a Pillow-made probe set (CPU)."""

from __future__ import annotations

import json

import pytest

from karl_verl.cli import main
from karl_verl.mastery import LEVEL_NAMES, MasteryTable
from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("mode", ["logprob", "generate"])
def test_probe_command_end_to_end(tmp_path, probe_parquet, tiny_checkpoint, capsys, mode):
    out = tmp_path / "tables" / "mastery.json"
    argv = ["probe", "--model", str(tiny_checkpoint), "--data", str(probe_parquet), "--out", str(out),
            "--mode", mode, "--per-entity", "2", "--batch-size", "4", "--device", "cpu", "--epoch", "1",
            "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    table = MasteryTable.load(out)
    assert len(table) == 9 and all(entry.num_questions == 2 and entry.epoch == 1 for entry in table.entries.values())
    raw = json.loads(out.read_text())
    assert raw["meta"]["mode"] == mode and raw["meta"]["model"] == str(tiny_checkpoint)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert all(name in printed for name in LEVEL_NAMES) and "18 questions, 9 entities" in printed
    assert ("unparseable replies" in printed) == (mode == "generate")
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_probe_command_reports_bad_data_without_loading_a_model(tmp_path, capsys):
    data = tmp_path / "probe.jsonl"
    data.write_text('{"entity": "a", "category": "c"}\n')
    out = tmp_path / "mastery.json"
    assert main(["probe", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("karl-verl probe: error:") and "row 1, field 'image'" in err
    assert not out.exists()


def test_probe_command_small_category(tmp_path, probe_kit, tiny_checkpoint, capsys):
    rows = probe_kit.rows({"car": ["a", "b", "c"], "dog": ["d", "e"]}, images_per_entity=1)
    data = probe_kit.write_parquet(tmp_path / "p.parquet", rows)
    out = tmp_path / "m.json"
    base = ["probe", "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "'car' has 3" in err and "pass --on-small-category global" in err and "on_small_category=" not in err
    assert main(base + ["--on-small-category", "global", "--device", "cpu"]) == 0
    assert len(MasteryTable.load(out)) == 5


def test_probe_command_warns_about_entities_with_few_questions(tmp_path, probe_parquet, tiny_checkpoint, capsys):
    out = tmp_path / "mastery.json"
    argv = ["probe", "--model", str(tiny_checkpoint), "--data", str(probe_parquet), "--out", str(out),
            "--per-entity", "2", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if line.startswith("karl-verl probe: warning:")]
    assert "9 entities have fewer than 10 questions" in warning and "and 4 more" in warning
    assert "raise --per-entity (now 2)" in warning


def test_thin_entity_message_lists_five_and_says_what_to_do():
    from karl_verl.commands.probe import format_thin_entities

    message = format_thin_entities({"a": 2, "b": 3}, per_entity=50)
    assert message.startswith("2 entities have fewer than 10 questions") and "a (2), b (3)" in message
    assert "add images of them to the probe set" in message


def test_histogram_labels_the_five_level_bands():
    from karl_verl.commands.probe import level_bands
    from karl_verl.config import MasteryConfig

    bands = level_bands(MasteryConfig().thresholds)
    assert [(low, high) for low, high, _ in bands] == [(0.7, 1.0), (0.45, 0.7), (0.3, 0.45), (0.1, 0.3), (0.0, 0.1)]
    assert [label for *_, label in bands] == [f"{i} {name}" for i, name in enumerate(LEVEL_NAMES, start=1)]


# ---- --backend vllm: max_model_len from the longest question ----


class _FakeVLLM:
    """Stands in for the engine VLLMBackend.create starts; records its keyword arguments."""

    created: list[dict] = []

    @classmethod
    def create(cls, model, **kwargs):
        cls.created.append({"model": model, **kwargs})
        return cls()

    def option_logprobs(self, requests, options):
        import numpy as np

        return np.log(np.full((len(requests), len(options)), 0.25))

    def generate(self, requests, sampling):
        return [["A"] for _ in requests]


@pytest.fixture()
def fake_vllm(monkeypatch):
    from karl_verl.backends.vllm_backend import VLLMBackend
    from karl_verl.commands import usage

    _FakeVLLM.created = []
    monkeypatch.setattr(VLLMBackend, "create", _FakeVLLM.create)
    monkeypatch.setattr(usage, "check_backend", lambda backend: None)  # vLLM is not installed here
    return _FakeVLLM


@pytest.fixture(scope="module")
def checkpoint_8b_images(tmp_path_factory):
    """The tiny model cutting images as Qwen3-VL-8B does: a photo becomes ~1,900 tokens."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny8b") / "model", image_geometry="qwen3_vl_8b")


def test_vllm_probe_sets_max_model_len_from_its_longest_question(tmp_path, probe_kit, checkpoint_8b_images,
                                                                   fake_vllm, capsys):
    from karl_verl.backends.base import load_image, structured_messages
    from karl_verl.backends.hf import load_processor
    from karl_verl.backends.vllm_backend import max_model_len_for
    from karl_verl.probe.questions import build_questions, load_probe_set
    from karl_verl.probe.runner import question_request

    rows = probe_kit.rows()
    rows[3]["image"] = {"bytes": probe_kit.png_bytes(3, size=(1600, 1200)), "path": None}
    data = probe_kit.write_parquet(tmp_path / "probe.parquet", rows)
    base = ["probe", "--model", str(checkpoint_8b_images), "--data", str(data), "--per-entity", "2",
            "--backend", "vllm", "--no-progress"]

    # What the processor makes of each question, images decoded: the longest is the photo's.
    processor = load_processor(checkpoint_8b_images)
    lengths = []
    for question in build_questions(load_probe_set(data), per_entity=2, seed=0):
        request = question_request(question)
        text = processor.apply_chat_template(structured_messages(request), add_generation_prompt=True, tokenize=False)
        images = [load_image(image) for image in request.images]
        lengths.append(int(processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1]))
    assert len(lengths) == 18 and 1800 < max(lengths) < 2100 and sorted(lengths)[-2] < 200

    for extra, answer_tokens in (([], 1), (["--mode", "generate", "--max-new-tokens", "200"], 200)):
        assert main([*base, "--out", str(tmp_path / "m.json"), *extra]) == 0
        expected = max_model_len_for(lengths, answer_tokens)
        assert fake_vllm.created[-1] == {"model": str(checkpoint_8b_images), "max_model_len": expected}
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "max_model_len" in line]
        unit = "token" if answer_tokens == 1 else "tokens"
        # The tiny model's KV: 2 layers x 2 KV heads x 16 wide, bfloat16 under vLLM: 256 bytes a token.
        assert line == (f"karl-verl probe: vLLM: max_model_len {expected} (longest of 18 questions: {max(lengths)} "
                        f"tokens + {answer_tokens} answer {unit}, rounded up); KV cache for one sequence at that "
                        f"length: {expected // 4} KiB (bfloat16, 256 B per token; vLLM needs room for one and "
                        "batches as many as fit)")
    assert [c["max_model_len"] for c in fake_vllm.created] == [2048, 2304]

    # --max-model-len overrides the count.
    assert main([*base, "--out", str(tmp_path / "m.json"), "--max-model-len", "4096"]) == 0
    assert fake_vllm.created[-1]["max_model_len"] == 4096
    assert "vLLM: max_model_len 4096 (from --max-model-len); KV cache for one sequence at that length: 1.0 MiB" \
        in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "m.json"), "--max-model-len", "0"]) == 2
    assert "--max-model-len must be >= 1" in capsys.readouterr().err

    # --max-pixels (karl.mastery.probe_max_pixels offline): the photo is resized before it is counted and asked.
    budgeted = []
    for question in build_questions(load_probe_set(data), per_entity=2, seed=0):
        request = question_request(question, max_pixels=401_408)
        text = processor.apply_chat_template(structured_messages(request), add_generation_prompt=True, tokenize=False)
        images = [load_image(image, max_pixels=401_408) for image in request.images]
        budgeted.append(int(processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1]))
    assert max(budgeted) < 600 < max(lengths)
    assert main([*base, "--out", str(tmp_path / "m.json"), "--max-pixels", "401408"]) == 0
    assert fake_vllm.created[-1]["max_model_len"] == max_model_len_for(budgeted, 1) == 512
    assert main([*base, "--out", str(tmp_path / "m.json"), "--max-pixels", "0"]) == 2
    assert "--max-pixels must be >= 1" in capsys.readouterr().err
