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


class Flaky(FakeModel):
    """A FakeModel whose backend cannot answer some questions: it says which, as RolloutProbeBackend does
    (``question_failures`` of the last call; NaN rows, None choices and None replies in their place)."""

    def __init__(self, questions, failing: dict, **kwargs):
        super().__init__(questions, **kwargs)
        self.failing = failing  # image -> QuestionFailure
        self.question_failures = {}

    def _failures(self, requests):
        self.question_failures = {i: self.failing[r.images[0]] for i, r in enumerate(requests)
                                  if r.images[0] in self.failing}
        return self.question_failures

    def option_logprobs(self, requests, options):
        scores = super().option_logprobs(requests, options)
        for index in self._failures(requests):
            scores[index] = np.nan
        return scores

    def choose_options(self, requests, options):
        failed = self._failures(requests)
        return [None if i in failed else options.index(self.by_image[r.images[0]]) for i, r in enumerate(requests)]

    def generate(self, requests, sampling):
        texts = super().generate(requests, sampling)
        return [None if i in self._failures(requests) else t for i, t in enumerate(texts)]


def _failing(questions):
    """Both questions of Cessna 172 (unreadable images) and Boeing 747's wrongly answered one (too long)."""
    from karl_verl.probe.runner import QuestionFailure

    cessna = [q for q in questions if q.entity == "Cessna 172"]
    boeing_wrong = [q for q in questions if q.entity == "Boeing 747"][1]  # FakeModel: the first is right
    failing = {q.image: QuestionFailure("unreadable image", f"{q.question_id}: cannot decode image") for q in cessna}
    failing[boeing_wrong.image] = QuestionFailure("prompt too long", "longer than the maximum model length")
    return failing, {q.question_id: failing[q.image] for q in [*cessna, boeing_wrong]}


@pytest.mark.parametrize("mode", ["logprob", "choice", "generate"])
def test_failed_questions_are_skipped_not_counted_wrong(questions, mode):
    failing, skipped = _failing(questions)
    result = run_probe(questions, Flaky(questions, failing), mode=mode, progress=False, chunk_size=4,
                       min_answered_share=0.8)
    assert result.skipped == skipped
    assert result.num_questions == 18 and result.num_answered == 15
    assert result.answered_share == pytest.approx(15 / 18)
    assert set(result.decisions) == {q.question_id for q in questions} - set(skipped)
    # ACC over the answered questions only: Boeing 747's remaining question is right (0.5 if counted wrong)
    assert result.per_entity_accuracy["Boeing 747"] == 1.0 and result.table.get("Boeing 747").num_questions == 1
    # an entity with no answered question has no measurement: out of the table (the trainer keeps its level)
    assert "Cessna 172" not in result.table and "Cessna 172" not in result.per_entity_accuracy
    assert result.unanswered_entities == ("Cessna 172",)
    assert {e: v for e, v in result.per_entity_accuracy.items()} == {
        e: (1.0 if e == "Boeing 747" else s) for e, s in SKILL.items() if e != "Cessna 172"}
    assert result.accuracy == pytest.approx(sum(SKILL.values()) * 2 / 15)  # the skipped ones were all wrong
    assert result.num_unparseable == 0 and result.skipped_by_kind() == {"unreadable image": 2, "prompt too long": 1}
    assert result.table.meta["num_skipped"] == 3
    assert result.table.meta["skipped_by_kind"] == {"prompt too long": 1, "unreadable image": 2}
    if mode == "generate":
        assert set(result.replies) == set(result.decisions)


def test_too_few_answered_questions_fail_the_probe_with_the_counts(questions):
    from karl_verl.probe.runner import TooFewAnswers

    failing, skipped = _failing(questions)
    with pytest.raises(TooFewAnswers) as caught:
        run_probe(questions, Flaky(questions, failing), mode="choice", progress=False, min_answered_share=0.9)
    message = str(caught.value)
    assert "answered 15 of 18 questions (83.3%)" in message and "below 0.9" in message
    assert "2 unreadable image, 1 prompt too long" in message
    first = sorted(skipped)[0]
    assert first in message and skipped[first].detail in message
    assert caught.value.num_questions == 18 and caught.value.skipped == skipped
    # the default: every question must be answered (a backend that reports no failures is unaffected)
    with pytest.raises(TooFewAnswers):
        run_probe(questions, Flaky(questions, failing), mode="choice", progress=False)
    assert run_probe(questions, FakeModel(questions), progress=False).skipped == {}


def test_a_failure_report_that_does_not_match_the_answers_is_an_error(questions):
    from karl_verl.probe.runner import QuestionFailure

    failing, _ = _failing(questions)

    class Misreported(Flaky):
        def option_logprobs(self, requests, options):
            scores = super().option_logprobs(requests, options)
            self.question_failures = {i + len(requests): f for i, f in self.question_failures.items()}
            return scores

    class FiniteRow(Flaky):  # says a question failed but scored it anyway: which is right?
        def option_logprobs(self, requests, options):
            scores = FakeModel.option_logprobs(self, requests, options)
            self._failures(requests)
            return scores

    class AnsweredChoice(Flaky):
        def choose_options(self, requests, options):
            self._failures(requests)
            return [0] * len(requests)

    class NotAFailure(Flaky):
        def _failures(self, requests):
            self.question_failures = {i: "unreadable" for i, r in enumerate(requests) if r.images[0] in self.failing}
            return self.question_failures

    with pytest.raises(ProbeError, match=r"question_failures names request \d+ of 4 asked"):
        run_probe(questions, Misreported(questions, failing), progress=False, chunk_size=4, min_answered_share=0.5)
    with pytest.raises(ProbeError, match="reported failed but has log-probabilities"):
        run_probe(questions, FiniteRow(questions, failing), progress=False, min_answered_share=0.5)
    with pytest.raises(ProbeError, match="reported failed but has an answer"):
        run_probe(questions, AnsweredChoice(questions, failing), mode="choice", progress=False, min_answered_share=0.5)
    with pytest.raises(ProbeError, match="expected a QuestionFailure"):
        run_probe(questions, NotAFailure(questions, failing), progress=False, min_answered_share=0.5)
    with pytest.raises(ProbeError, match="min_answered_share"):
        run_probe(questions, FakeModel(questions), progress=False, min_answered_share=0.0)
    # a None choice without a reported failure is still malformed
    class Silent(Flaky):
        def choose_options(self, requests, options):
            out = super().choose_options(requests, options)
            self.question_failures = {}
            return out

    with pytest.raises(ProbeError, match="option indices"):
        run_probe(questions, Silent(questions, failing), mode="choice", progress=False, min_answered_share=0.5)
    assert QuestionFailure("timeout", "x").kind == "timeout"


def test_the_probe_on_prompts_of_the_8bs_length(tmp_path):
    """The tiny Qwen3-VL saved with Qwen3-VL-8B's image geometry, loaded by HFBackend.from_pretrained as the
    offline probe does, on photo-sized probe images: each prompt holds the 8B's image token count (a 1600x1200
    image is 1,900 tokens) and every question gets an answer."""
    from sized_data import smart_resize_tokens, write_sized_probe_parquet

    from karl_verl.backends.base import load_image
    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

    class CountingBackend(HFBackend):
        """HFBackend that records, per request, its prompt's length and its image tokens."""

        def encode(self, requests, *, first_index=0):
            inputs = super().encode(requests, first_index=first_index)
            pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            self.counts.extend(zip(inputs["attention_mask"].sum(dim=1).tolist(),
                                   (inputs["input_ids"] == pad).sum(dim=1).tolist(), strict=True))
            return inputs

    sizes = [(448, 448), (1024, 768), (1600, 1200), (640, 480)]  # one image of each of 4 entities
    probe = write_sized_probe_parquet(tmp_path / "probe.parquet", sizes)
    backend = CountingBackend.from_pretrained(save_tiny_checkpoint(tmp_path / "tiny-8b", image_geometry="qwen3_vl_8b"),
                                              device="cpu", batch_size=2, progress=False)
    backend.counts = []
    questions = build_questions(load_probe_set(probe), per_entity=1, seed=0)
    result = run_probe(questions, backend, mode="logprob", progress=False)

    expected = [smart_resize_tokens(*load_image(q.image).size) for q in questions]
    assert sorted(expected) == sorted(smart_resize_tokens(*size) for size in sizes)
    assert [image_tokens for _, image_tokens in backend.counts] == expected
    longest = max(length for length, _ in backend.counts)
    assert longest > 1900 == max(expected)  # the 1600x1200 image's prompt
    assert result.num_questions == len(questions) == 4
    assert set(result.decisions) == {q.question_id for q in questions}
    assert all(letter in LETTERS for letter in result.decisions.values())
    assert set(result.table.entries) == {q.entity for q in questions}
