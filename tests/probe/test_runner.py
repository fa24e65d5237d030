"""run_probe with fake backends (exact numbers) and with the tiny Qwen3-VL through HFBackend (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from karl_verl.backends.base import SamplingSettings
from karl_verl.backends.hf import HFBackend
from karl_verl.mastery import MasteryTable
from karl_verl.probe.questions import LETTERS, ProbeError, build_questions, load_probe_set
from karl_verl.probe.runner import DEFAULT_PROBE_SAMPLING, question_request, run_probe
from karl_verl.testing.tiny_qwen3vl import build_tiny_model, build_tiny_processor, build_tiny_tokenizer

# Which share of its questions the fake model gets right, per entity.
SKILL = {"Airbus A320": 1.0, "Boeing 747": 0.5, "Cessna 172": 0.0, "Sukhoi Su-30": 0.5,
         "Audi A4": 1.0, "BMW M3": 1.0, "Fiat 500": 0.0, "Tesla Model 3": 0.5, "Volvo XC90": 0.5}


class FakeModel:
    """Answers each question right or wrong by the entity's SKILL (first images right), letter by image."""

    def __init__(self, questions, *, drop_last: bool = False, replies: dict | None = None):
        self.by_image = {}
        seen: dict[str, int] = {}
        for q in questions:
            k = seen[q.entity] = seen.get(q.entity, 0) + 1
            right = k <= round(SKILL[q.entity] * 2)  # two questions per entity
            wrong = LETTERS[(LETTERS.index(q.answer_letter) + 1) % 4]
            self.by_image[q.image] = q.answer_letter if right else wrong
        self.drop_last = drop_last
        self.replies = replies or {}
        self.calls = 0

    def option_logprobs(self, requests, options):
        self.calls += 1
        rows = []
        for request in requests:
            letter = self.by_image[request.images[0]]
            probabilities = np.full(len(options), 0.1)
            probabilities[options.index(letter)] = 0.7
            rows.append(np.log(probabilities * 0.5))  # half the mass on other tokens
        return np.array(rows[:-1] if self.drop_last else rows)

    def generate(self, requests, sampling):
        self.calls += 1
        letters = [self.by_image[r.images[0]] for r in requests]
        out = [[self.replies.get(letter, f"Answer: {letter}")] for letter in letters]
        return out[:-1] if self.drop_last else out


@pytest.fixture()
def questions(probe_parquet):
    return build_questions(load_probe_set(probe_parquet), seed=0)


def test_question_request_is_verl_style(questions):
    request = question_request(questions[0])
    assert request.messages == [{"role": "user", "content": questions[0].prompt}]
    assert request.images == [questions[0].image] and request.messages[0]["content"].startswith("<image>")


def test_logprob_mode_with_a_fake_model(questions):
    backend = FakeModel(questions)
    result = run_probe(questions, backend, mode="logprob", epoch=3, progress=False, chunk_size=4)
    assert backend.calls == 5  # 18 questions in chunks of 4
    assert result.per_entity_accuracy == SKILL
    assert result.num_questions == 18 and result.num_unparseable == 0 and result.mode == "logprob"
    assert result.accuracy == pytest.approx(sum(SKILL.values()) * 2 / 18)
    # softmax over the letters: 0.7 / (0.7 + 3 * 0.1) on the right letter, 0.1 when wrong.
    for entity, skill in SKILL.items():
        assert result.per_entity_expected_accuracy[entity] == pytest.approx(skill * 0.7 + (1 - skill) * 0.1)
    assert isinstance(result.table, MasteryTable) and result.table.level_of("Airbus A320") == 1
    assert result.table.level_of("Boeing 747") == 2 and result.table.level_of("Cessna 172") == 5
    assert result.table.get("Audi A4").epoch == 3 and result.table.get("Audi A4").num_questions == 2
    assert result.table.meta["mode"] == "logprob" and result.table.meta["num_questions"] == 18
    assert set(result.decisions) == {q.question_id for q in questions}
    assert result.wall_time_s >= 0 and result.replies == {}


def test_generate_mode_counts_unparseable_replies(questions):
    backend = FakeModel(questions, replies={"A": "I am not sure."})
    result = run_probe(questions, backend, mode="generate", progress=False)
    unreadable = [q for q in questions if backend.by_image[q.image] == "A"]
    assert result.num_unparseable == len(unreadable) > 0
    assert all(result.decisions[q.question_id] is None for q in unreadable)
    assert result.per_entity_expected_accuracy is None and len(result.replies) == 18


def test_thresholds_come_from_the_caller(questions):
    strict = run_probe(questions, FakeModel(questions), thresholds=(0.99, 0.9, 0.8, 0.7), progress=False)
    assert strict.table.level_of("Boeing 747") == 5 and strict.table.level_of("Airbus A320") == 1


@pytest.mark.parametrize("mode", ["logprob", "generate"])
def test_short_backend_output_is_an_error_not_a_silent_result(questions, mode):
    with pytest.raises(ProbeError, match="expected"):
        run_probe(questions, FakeModel(questions, drop_last=True), mode=mode, progress=False)


def test_bad_backend_values_and_arguments(questions):
    class Nan(FakeModel):
        def option_logprobs(self, requests, options):
            return np.full((len(requests), 4), np.nan)

    class Hopeless(FakeModel):
        def option_logprobs(self, requests, options):
            return np.full((len(requests), 4), -np.inf)

    with pytest.raises(ProbeError, match="log-probabilities"):
        run_probe(questions, Nan(questions), progress=False)
    with pytest.raises(ProbeError, match="every letter is -inf"):
        run_probe(questions, Hopeless(questions), progress=False)
    with pytest.raises(ProbeError, match="needs a backend with generate"):
        run_probe(questions, object(), mode="generate", progress=False)
    with pytest.raises(ProbeError, match="mode"):
        run_probe(questions, FakeModel(questions), mode="vote", progress=False)
    with pytest.raises(ProbeError, match="no questions"):
        run_probe([], FakeModel(questions), progress=False)
    with pytest.raises(ProbeError, match="not unique"):
        run_probe(questions + questions[:1], FakeModel(questions), progress=False)
    with pytest.raises(ProbeError, match="n=2"):
        run_probe(questions, FakeModel(questions), mode="generate", sampling=SamplingSettings(n=2), progress=False)
    assert DEFAULT_PROBE_SAMPLING.temperature == 0.0 and DEFAULT_PROBE_SAMPLING.n == 1


def test_both_modes_on_the_tiny_model(questions):
    tokenizer = build_tiny_tokenizer()
    backend = HFBackend(build_tiny_model(0, tokenizer), build_tiny_processor(tokenizer), batch_size=8, progress=False)
    subset = questions[::2]  # one question per entity
    scored = run_probe(subset, backend, mode="logprob", progress=False)
    assert set(scored.table.entries) == set(SKILL) and all(c in LETTERS for c in scored.decisions.values())
    assert all(0 < p < 1 for p in scored.per_entity_expected_accuracy.values())
    generated = run_probe(
        subset, backend, mode="generate", progress=False, sampling=SamplingSettings(temperature=0, max_new_tokens=3)
    )
    assert generated.num_questions == 9 and set(generated.table.entries) == set(SKILL)
