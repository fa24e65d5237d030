"""The in-training probe backend (karl_verl/integration/rollout_probe.py) against a fake rollout server.

What is real: verl's prompt machinery (``AgentLoopBase`` helpers, the Continuous Token builder for
Qwen3-VL, the tiny Qwen3-VL tokenizer and processor), the probe runner, and the ``karl`` trainer's
refresh. What is fake: the server behind ``LLMServerClient.generate`` (a vLLM replica on GPU), which
answers from the decoded prompt and image the way verl's vLLM server shapes its output
(``extract_prompt_logprobs``: entry j scores prompt token j + 1, a dummy entry last). Not covered on
CPU: a real vLLM replica returning ``prompt_logprobs``.

verl's default dataset class decodes images with qwen_vl_utils, which needs torchvision (absent on
CPU machines here); :class:`NoTorchvisionDataset` hands the PIL images through unchanged instead
(selected with verl's own ``data.custom_cls``). Real runs have torchvision (it comes with vLLM).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image
from trainer_harness import compose_verl_config
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from karl_verl.backends.base import BackendError, GenerationRequest, SamplingSettings
from karl_verl.integration.rollout_probe import (
    ProbeCancelled,
    PromptCache,
    PromptEncodingError,
    RolloutProbeBackend,
    ShortAnswerError,
    UnreadableImageError,
    _failure,
    failure_kind,
    prompt_key,
)
from karl_verl.probe.questions import LETTERS, ProbeItem, build_questions
from karl_verl.probe.runner import QuestionFailure, TooFewAnswers, run_probe
from karl_verl.testing.tiny_qwen3vl import build_tiny_processor, build_tiny_tokenizer

COLORS = {"Su-30": (250, 0, 0), "F-16": (0, 250, 0), "MiG-29": (0, 0, 250), "J-10": (250, 250, 0)}


class NoTorchvisionDataset(RLHFDataset):
    """verl's RLHFDataset whose image extraction passes the message's PIL images through (no qwen_vl_utils)."""

    @classmethod
    def _process_multi_modal_info(cls, messages, image_patch_size, config):
        images = [part["image"] for message in messages if isinstance(message["content"], list)
                  for part in message["content"] if part.get("type") == "image"]
        return images or None, None, None


class FakeServer:
    """Stands in for ``LLMServerClient`` + vLLM replicas; knows the entities in ``known``.

    At the answer position the right letter gets log-prob -0.1 when the entity is known, else a
    wrong letter does; the other letters get -6.0, below 20 filler tokens. It answers
    ``prompt_logprobs`` requests (any k) and one-token requests constrained by ``allowed_token_ids``.
    """

    def __init__(self, tokenizer, known=(), rollout="vllm"):
        self.tokenizer = tokenizer
        self.known = set(known)
        self.requests: list[dict] = []
        self.hang = False
        self.stop_reason = "completed"
        self.reply = "B"
        self.misalign = False
        self.letter_ids = {letter: tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS}
        self.filler = [i for i in range(100, 200) if i not in self.letter_ids.values()][:20]
        #: Prompts this long or longer are refused as vLLM's engine refuses them (None: no limit).
        self.max_model_len: int | None = None
        #: Entities whose requests end in a server-side exception (a crashed replica, say).
        self.broken: set[str] = set()

    @staticmethod
    def entity_of(image):
        return next(e for e, color in COLORS.items() if image.getpixel((0, 0)) == color)

    def answer_distribution(self, prompt_ids, image):
        text = self.tokenizer.decode(prompt_ids)
        options = dict((name, letter) for letter, name in re.findall(r"^([ABCD])\. (.+)$", text, re.M))
        entity = self.entity_of(image)
        right = options[entity]
        chosen = right if entity in self.known else LETTERS[(LETTERS.index(right) + 1) % 4]
        dist = {self.letter_ids[letter]: (-0.1 if letter == chosen else -6.0) for letter in LETTERS}
        dist.update({token: -1.0 - i / 100 for i, token in enumerate(self.filler)})
        return dist

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, **kwargs):
        self.requests.append({"prompt_ids": list(prompt_ids), "sampling_params": dict(sampling_params),
                              "image_data": image_data})
        if self.hang:
            await asyncio.sleep(3600)
        if self.max_model_len is not None and len(prompt_ids) >= self.max_model_len:
            # vLLM's own wording (verl's server words it "... maximum context length ...")
            raise ValueError(f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum model "
                             f"length of {self.max_model_len}. Make sure that `max_model_len` is no smaller than "
                             "the number of text tokens plus multimodal tokens.")
        if self.broken and self.entity_of(image_data[0]) in self.broken:
            raise RuntimeError("replica 2: CUDA error: an illegal memory access was encountered")
        if "allowed_token_ids" in sampling_params:
            dist = self.answer_distribution(prompt_ids, image_data[0])
            allowed = sampling_params["allowed_token_ids"]
            best = max(allowed, key=lambda token: dist.get(token, -20.0))
            return TokenOutput(token_ids=[best + 1 if self.misalign else best], stop_reason=self.stop_reason,
                               extra_fields={})
        if "prompt_logprobs" not in sampling_params:
            return TokenOutput(token_ids=self.tokenizer.encode(self.reply, add_special_tokens=False),
                               stop_reason=self.stop_reason, extra_fields={})
        k = sampling_params["prompt_logprobs"]
        dist = self.answer_distribution(prompt_ids[:-1], image_data[0])
        appended = prompt_ids[-1]
        if k == 0:
            answer_ids, answer_lps = [appended], [dist.get(appended, -20.0)]
        else:
            top = sorted(dist.items(), key=lambda item: -item[1])[:k]
            answer_ids, answer_lps = [t for t, _ in top], [lp for _, lp in top]
        if self.misalign and k == 0:
            answer_ids = [answer_ids[0] + 1]
        width = max(k, 1)
        ids = [[t] * width for t in prompt_ids[1:-1]] + [answer_ids] + [[0] * width]
        lps = [[-0.5] * width for _ in prompt_ids[1:-1]] + [answer_lps] + [[0.0] * width]
        return TokenOutput(token_ids=[7], stop_reason=self.stop_reason,
                           extra_fields={"prompt_ids": ids, "prompt_logprobs": lps})


@pytest.fixture(scope="module")
def verl_config():
    return compose_verl_config("actor_rollout_ref.rollout.name=vllm",
                               f"data.custom_cls.path={os.path.abspath(__file__)}",
                               "data.custom_cls.name=NoTorchvisionDataset")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_tiny_processor(tokenizer)


@pytest.fixture(scope="module")
def questions():
    items = [ProbeItem(entity=entity, category="aircraft", image=Image.new("RGB", (32, 32), color),
                       image_id=f"{entity}-{k}") for entity, color in COLORS.items() for k in range(2)]
    return build_questions(items, per_entity=2, seed=0)


def make_backend(server, tokenizer, processor, config, **kwargs):
    return RolloutProbeBackend(server, tokenizer=tokenizer, processor=processor, config=config,
                               hf_model_type="qwen3_vl", **kwargs)


def request_of(question):
    return GenerationRequest(messages=[{"role": "user", "content": question.prompt}], images=[question.image])


def test_prompt_is_built_as_the_agent_loop_builds_it(verl_config, tokenizer, processor, questions):
    server = FakeServer(tokenizer, known=COLORS)
    backend = make_backend(server, tokenizer, processor, verl_config)
    try:
        scores = backend.option_logprobs([request_of(questions[0])], list(LETTERS))
    finally:
        backend.close()
    first = server.requests[0]
    text = tokenizer.decode(first["prompt_ids"])
    # chat template, the image expanded into its patch tokens, the question, the generation prompt,
    # then the first option's token: the position whose log-probs are read
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert "What is the aircraft in the image?" in text
    assert text.endswith("<|im_start|>assistant\nA")
    # only the actual tokens' log-probabilities (no top-k), one request per option
    assert first["sampling_params"] == {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0,
                                        "detokenize": False}
    assert len(first["image_data"]) == 1 and isinstance(first["image_data"][0], Image.Image)
    right = LETTERS.index(questions[0].answer_letter)
    assert scores.shape == (1, 4) and scores[0, right] == pytest.approx(-0.1)
    assert np.allclose(np.delete(scores[0], right), -6.0)


def test_the_pixel_budget_reaches_the_servers_image_and_prompt(verl_config, tokenizer, questions):
    """karl.mastery.probe_max_pixels: the image verl's dataset class prepares, and so its tokens, are the resized
    one (Qwen3-VL-8B's processor: one token per 32x32 pixels, at least 65,536 pixels)."""
    from karl_verl.probe.runner import question_request

    processor = build_tiny_processor(tokenizer, image_geometry="qwen3_vl_8b")
    question = dataclasses.replace(questions[0], image=Image.new("RGB", (512, 256), COLORS[questions[0].entity]))
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    seen = {}
    for budget in (None, 384 * 192):
        server = FakeServer(tokenizer, known=COLORS)
        backend = make_backend(server, tokenizer, processor, verl_config)
        try:
            backend.choose_options([question_request(question, max_pixels=budget)], list(LETTERS))
            assert not backend.question_failures
        finally:
            backend.close()
        [sent] = server.requests
        seen[budget] = (sent["image_data"][0].size, sent["prompt_ids"].count(image_pad))
    assert seen[None] == ((512, 256), 16 * 8)
    assert seen[384 * 192] == ((384, 192), 12 * 6)


def test_logprob_mode_asks_each_option_once_and_choice_mode_one_constrained_token(
        verl_config, tokenizer, processor, questions):
    server = FakeServer(tokenizer, known=COLORS)
    backend = make_backend(server, tokenizer, processor, verl_config)
    try:
        backend.option_logprobs([request_of(questions[0])], list(LETTERS))
        assert sorted(tokenizer.decode(r["prompt_ids"][-1:]) for r in server.requests) == list(LETTERS)
        assert all(r["sampling_params"]["prompt_logprobs"] == 0 for r in server.requests)
        logprob_requests = list(server.requests)
        server.requests.clear()
        picked = backend.choose_options([request_of(q) for q in questions], list(LETTERS))
    finally:
        backend.close()
    assert picked == [LETTERS.index(q.answer_letter) for q in questions]  # every entity known
    assert len(server.requests) == len(questions)
    # The cost per question that docs/METHOD.md states: logprob mode sends the prompt (and its image)
    # four times, each one token longer; choice mode sends it once.
    prompt_tokens = len(server.requests[0]["prompt_ids"])
    assert [len(r["prompt_ids"]) for r in logprob_requests] == [prompt_tokens + 1] * 4
    assert sum(len(r["image_data"]) for r in logprob_requests) == 4
    assert len(server.requests[0]["image_data"]) == 1
    letter_ids = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS]
    assert all(r["sampling_params"] == {"max_tokens": 1, "temperature": 0.0, "allowed_token_ids": letter_ids,
                                        "logprobs": False, "detokenize": False} for r in server.requests)
    # the prompt itself ends at the generation prompt: nothing appended
    assert tokenizer.decode(server.requests[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_choice_and_logprob_modes_give_the_same_table(verl_config, tokenizer, processor, questions):
    tables = {}
    for mode in ("logprob", "choice"):
        server = FakeServer(tokenizer, known={"Su-30", "J-10"})
        backend = make_backend(server, tokenizer, processor, verl_config)
        try:
            tables[mode] = run_probe(questions, backend, mode=mode, progress=False)
        finally:
            backend.close()
    assert tables["logprob"].table.entries == tables["choice"].table.entries
    assert tables["logprob"].per_entity_expected_accuracy is not None
    assert tables["choice"].per_entity_expected_accuracy is None


def test_run_probe_on_the_rollout_backend_builds_the_table(verl_config, tokenizer, processor, questions):
    server = FakeServer(tokenizer, known={"Su-30", "J-10"})
    backend = make_backend(server, tokenizer, processor, verl_config, max_concurrency=3)
    try:
        result = run_probe(questions, backend, mode="logprob", progress=False, chunk_size=5)
    finally:
        backend.close()
    assert result.per_entity_accuracy == {"F-16": 0.0, "J-10": 1.0, "MiG-29": 0.0, "Su-30": 1.0}
    assert {e: result.table.level_of(e) for e in COLORS} == {"Su-30": 1, "J-10": 1, "F-16": 5, "MiG-29": 5}


def test_generate_mode(verl_config, tokenizer, processor, questions):
    server = FakeServer(tokenizer)
    backend = make_backend(server, tokenizer, processor, verl_config)
    try:
        texts = backend.generate([request_of(q) for q in questions[:2]], SamplingSettings(temperature=0.0, n=2,
                                                                                          seed=7, max_new_tokens=16))
    finally:
        backend.close()
    assert texts == [["B", "B"], ["B", "B"]]
    params = [r["sampling_params"] for r in server.requests]
    assert sorted(p["seed"] for p in params) == [7, 8, 9, 10]
    assert all(p["max_tokens"] == 16 and p["temperature"] == 0.0 and p["logprobs"] is False for p in params)


@pytest.mark.parametrize("fault", ["aborted", "empty", "misaligned", "off_option"])
def test_short_answers_cost_their_question(verl_config, tokenizer, processor, questions, fault):
    server = FakeServer(tokenizer, known=COLORS)
    server.stop_reason = "aborted" if fault == "aborted" else "completed"
    server.reply = "" if fault == "empty" else "B"
    server.misalign = fault in ("misaligned", "off_option")
    backend = make_backend(server, tokenizer, processor, verl_config)
    requests = [request_of(questions[0])]
    try:
        if fault in ("misaligned", "aborted"):
            answers = backend.option_logprobs(requests, list(LETTERS))
            assert answers.shape == (1, 4) and np.isnan(answers).all()
        elif fault == "off_option":  # the constrained token is not one of the options
            assert backend.choose_options(requests, list(LETTERS)) == [None]
        else:
            assert backend.generate(requests, SamplingSettings(n=1)) == [None]
    finally:
        backend.close()
    (failure,) = backend.question_failures.values()
    assert failure.kind == "short answer" and failure.detail.startswith("probe request 0: ")


def corrupt(question):
    """The question with an image that is not one (bytes no decoder reads)."""
    return dataclasses.replace(question, image=b"\x89PNG\r\n\x1a\n this is not an image")


def too_long(question, words):
    """The question with a prompt longer than the others (a long entity list, say): 4 tokens a word."""
    return dataclasses.replace(question, prompt=question.prompt + " Think about it." * words)


@pytest.mark.parametrize("mode", ["logprob", "choice", "generate"])
def test_a_failing_question_is_recorded_and_the_others_are_answered(verl_config, tokenizer, processor, questions,
                                                                    mode):
    # Prompts are about 75 tokens. Question 3's (about 195) passes verl's prompt builder but not a server
    # with max_model_len 150; question 6's (over 1000) is refused by the builder (rollout.prompt_length 512).
    asked = [corrupt(questions[0]), *questions[1:3], too_long(questions[3], 30), *questions[4:6],
             too_long(questions[6], 300), questions[7]]
    server = FakeServer(tokenizer, known=COLORS)
    server.max_model_len = 150
    server.broken = {questions[5].entity}  # questions 4 and 5 (two per entity)
    assert questions[4].entity == questions[5].entity != questions[7].entity
    backend = make_backend(server, tokenizer, processor, verl_config, max_concurrency=3)
    requests = [request_of(q) for q in asked]
    try:
        if mode == "logprob":
            answers = backend.option_logprobs(requests, list(LETTERS))
            answered = [int(np.argmax(row)) if not np.isnan(row).all() else None for row in answers]
        elif mode == "choice":
            answered = backend.choose_options(requests, list(LETTERS))
        else:
            texts = backend.generate(requests, SamplingSettings(temperature=0.0, n=1, max_new_tokens=4))
            answered = [None if t is None else 1 for t in texts]
    finally:
        backend.close()
    failures = backend.question_failures
    assert {i: f.kind for i, f in failures.items()} == {
        0: "unreadable image", 3: "prompt too long", 4: "server error: RuntimeError", 5: "server error: RuntimeError",
        6: "prompt too long"}
    assert "probe request 0, image 0: cannot decode image" in failures[0].detail
    assert "longer than the maximum model length of 150" in failures[3].detail
    assert "illegal memory access" in failures[4].detail
    assert "probe request 6: cannot build the prompt" in failures[6].detail and "rollout.prompt_length" in \
        failures[6].detail
    # every other question has its answer, in its place
    expected = [LETTERS.index(q.answer_letter) if mode != "generate" else 1 for q in asked]
    assert answered == [None if i in failures else expected[i] for i in range(len(asked))]
    # neither the corrupt image nor the prompt the builder refused reached a server; the 6 others did
    assert len(server.requests) == 6 * (4 if mode == "logprob" else 1)


def ray_wrapped(error):
    """``error`` as it reaches the trainer from a Ray actor (verl's servers are Ray actors)."""
    from ray.exceptions import RayTaskError

    traceback = f"Traceback (most recent call last):\n  ...\n{error!r}"
    return RayTaskError("generate", traceback, error).as_instanceof_cause()


@pytest.mark.parametrize(("error", "kind"), [
    # verl 0.9.1's vLLM server, vLLM's engine, karl-verl's CPU rollout, verl's prompt builder
    (ValueError("Prompt length (5000) leaves no room to generate within the model's maximum context length (4096); "
                "need at least 1 token of headroom."), "prompt too long"),
    (ValueError("The decoder prompt (length 5000) is longer than the maximum model length of 4096."),
     "prompt too long"),
    (ValueError("prompt of 5000 tokens leaves no room within max_model_len 4096"), "prompt too long"),
    (PromptEncodingError("probe request 3: cannot build the prompt (ValueError: Multimodal prompt produced 2774 "
                         "tokens, exceeding rollout.prompt_length=512.)"), "prompt too long"),
    (PromptEncodingError("probe request 3: cannot build the prompt (KeyError: 'content')"), "encoding error"),
    (UnreadableImageError("probe request 0, image 0: cannot decode image"), "unreadable image"),
    (ShortAnswerError("probe request 0: the rollout server aborted the request"), "short answer"),
    (asyncio.TimeoutError(), "timeout"),
    (ConnectionError("replica 3 went away"), "server error: ConnectionError"),
    (ray_wrapped(ValueError("The decoder prompt (length 5000) is longer than the maximum model length of 4096.")),
     "prompt too long"),
    (ray_wrapped(KeyError("prompt_ids")), "server error: KeyError"),
])
def test_failure_kinds(error, kind):
    assert failure_kind(error) == kind


def test_a_ray_wrapped_failure_reads_as_the_servers_own_message():
    message = "prompt of 5000 tokens leaves no room within max_model_len 4096"
    assert _failure(ray_wrapped(ValueError(message))) == QuestionFailure("prompt too long", message)


def test_run_probe_skips_the_failed_questions(verl_config, tokenizer, processor, questions):
    asked = [corrupt(questions[0]), *questions[1:]]
    server = FakeServer(tokenizer, known={"Su-30", "J-10"})
    backend = make_backend(server, tokenizer, processor, verl_config)
    try:
        result = run_probe(asked, backend, mode="choice", progress=False, min_answered_share=0.85)
        assert result.skipped.keys() == {asked[0].question_id} and result.num_answered == 7
        assert result.per_entity_accuracy == {"F-16": 0.0, "J-10": 1.0, "MiG-29": 0.0, "Su-30": 1.0}
        assert result.table.get(asked[0].entity).num_questions == 1
        with pytest.raises(TooFewAnswers, match=r"answered 7 of 8 questions \(87.5%\), below 0.9 .*: 1 unreadable "
                                                rf"image; skipped: {re.escape(repr(asked[0].question_id))} "
                                                r"\(unreadable image\); first error: probe request 0, image 0"):
            run_probe(asked, backend, mode="choice", progress=False, min_answered_share=0.9)
    finally:
        backend.close()


def test_cancel_stops_requests_in_flight(verl_config, tokenizer, processor, questions):
    server = FakeServer(tokenizer)
    server.hang = True
    backend = make_backend(server, tokenizer, processor, verl_config)
    outcome = {}
    asked = [corrupt(questions[0]), *questions[1:]]  # a failed question does not stop the cancel either

    def probe():
        try:
            backend.option_logprobs([request_of(q) for q in asked], list(LETTERS))
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=probe)
    thread.start()
    deadline = time.monotonic() + 60
    while len(server.requests) < 4 * (len(asked) - 1):  # every other question is in flight
        assert thread.is_alive() and time.monotonic() < deadline, (outcome, len(server.requests))
        thread.join(0.01)
    backend.cancel()
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome["error"], ProbeCancelled)
    with pytest.raises(ProbeCancelled):
        backend.generate([request_of(questions[0])], SamplingSettings())
    backend.close()


def test_logprob_mode_needs_vllm(verl_config, tokenizer, processor, questions):
    config = copy.deepcopy(verl_config)
    config.actor_rollout_ref.rollout.name = "sglang"
    backend = make_backend(FakeServer(tokenizer), tokenizer, processor, config)
    assert not backend.supports_logprobs
    with pytest.raises(BackendError, match="prompt log-probabilities"):
        backend.option_logprobs([request_of(questions[0])], list(LETTERS))
    with pytest.raises(BackendError, match="allowed_token_ids"):
        backend.choose_options([request_of(questions[0])], list(LETTERS))


def test_trainer_refresh_through_the_rollout_backend(verl_config, tokenizer, processor, questions, tmp_path):
    """The karl trainer's refresh, end to end down to the (fake) server: the table, and a timeout."""
    from karl_verl.integration.trainer import KarlTrainer

    config = copy.deepcopy(verl_config)
    config.algorithm.adv_estimator = "karl_grpo"
    config.trainer.default_local_dir = str(tmp_path)
    config.karl = {"mastery": {"probe_data": "in-memory", "probe_timeout_s": 1.0}}
    trainer = KarlTrainer(config)
    trainer.karl_mastery.questions = questions  # what load_probe_set + build_questions give (tested in tests/probe)
    trainer.steps_per_epoch, trainer.global_steps = 2, 1
    server = FakeServer(tokenizer, known={"Su-30"})
    trainer.karl_probe_backend = lambda: make_backend(server, tokenizer, processor, config)
    trainer.on_train_begin()
    assert trainer.karl_state.table.level_of("Su-30") == 1 and trainer.karl_state.table.level_of("F-16") == 5

    server.known.add("F-16")
    trainer.global_steps = 3
    trainer.on_step_begin()
    assert trainer.karl_state.history[-1].moved_up == 1 and trainer.karl_state.table.level_of("F-16") == 1

    server.hang = True
    trainer.global_steps = 5
    trainer.on_step_begin()
    record = trainer.karl_state.history[-1]
    assert record.status == "failed" and "ProbeTimeout" in record.error
    assert trainer.karl_state.table.level_of("F-16") == 1


def write_color_probe_set(path, *, per_entity, corrupt_row):
    """A parquet probe set of the COLORS aircraft, ``per_entity`` images each; row ``corrupt_row`` (from 1)
    holds bytes that are no image (as a truncated download would)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for entity, color in COLORS.items():
        for k in range(per_entity):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
            data = buffer.getvalue()
            if len(rows) + 1 == corrupt_row:
                data = data[:40]
            rows.append({"entity": entity, "category": "aircraft", "image": {"bytes": data, "path": None},
                         "image_id": f"{entity}-{k}"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_the_prompt_cache_round_trips_and_keeps_its_budget():
    image_pad = [151655] * 900
    prompt = [151644, 872, 198, 151652, *image_pad, 151653, 3838, 374, 279, 198, 151645, 198, 77091, 198]
    cache = PromptCache(max_bytes=4096)
    key = (("user", "q1"), (("row", "/p.parquet", 0, "image"),), None)
    cache.put(key, prompt, ((640, 480),))
    assert cache.get(key, ((640, 480),)) == prompt
    # run-length encoded: 14 runs of int32 values and lengths, not 914 ids
    assert len(cache) == 1 and cache.nbytes < 1024
    # the same question whose image came out another size is a miss (rebuilt), and so is an unknown key
    assert cache.get(key, ((320, 240),)) is None and cache.get(None, ()) is None
    assert cache.take_counts() == (1, 2) and cache.take_counts() == (0, 0)
    # past the budget nothing more is added (and nothing evicted)
    for i in range(20):
        cache.put((("user", f"q{i + 2}"), (), None), prompt, ((640, 480),))
    assert cache.nbytes <= 4096 and 1 < len(cache) < 21 and cache.get(key, ((640, 480),)) == prompt
    assert PromptCache(max_bytes=0).put(key, prompt, ()) is None and len(PromptCache(0)) == 0


def test_prompt_keys_tell_questions_apart_across_refreshes():
    from karl_verl.probe.questions import ParquetImage

    def request(image, text="What is it?", max_pixels=None):
        return GenerationRequest(messages=[{"role": "user", "content": text}], images=[image], max_pixels=max_pixels)

    row = ParquetImage("/data/probe.parquet", 3)
    assert prompt_key(request(row)) == prompt_key(request(ParquetImage("/data/probe.parquet", 3)))
    assert prompt_key(request(row)) != prompt_key(request(ParquetImage("/data/probe.parquet", 4)))
    assert prompt_key(request(row)) != prompt_key(request(row, max_pixels=65536))
    assert prompt_key(request(row)) != prompt_key(request(row, text="Which is it?"))
    assert prompt_key(request(b"png-1")) == prompt_key(request(b"png-1")) != prompt_key(request(b"png-2"))
    assert prompt_key(request("/img/a.jpg")) != prompt_key(request("/img/b.jpg"))
    # a decoded image has no identity that lasts from one refresh to the next: never cached
    assert prompt_key(request(Image.new("RGB", (4, 4)))) is None


def test_a_refresh_reuses_the_prompts_an_earlier_one_built(verl_config, tokenizer, processor, tmp_path):
    """Three refreshes of a lazily read probe set, each with a fresh backend (as the trainer makes them)
    sharing one cache: the first builds every prompt, the later ones take them from the cache, and
    the servers get the same prompt ids and images every time. A cache entry is what the server
    gets (a planted entry reaches it), so the reuse is real, not a rebuild that happens to agree."""
    from karl_verl.probe.questions import load_probe_set
    from karl_verl.probe.runner import question_request

    probe_path = write_color_probe_set(tmp_path / "probe.parquet", per_entity=3, corrupt_row=0)
    questions = build_questions(load_probe_set(probe_path, lazy=True), per_entity=3, seed=0)
    requests = [question_request(q) for q in questions]
    cache = PromptCache(max_bytes=2**20)
    sent = []
    for _ in range(3):
        server = FakeServer(tokenizer, known={"Su-30", "MiG-29"})
        backend = make_backend(server, tokenizer, processor, verl_config, prompt_cache=cache)
        try:
            choices = backend.choose_options(requests, list(LETTERS))
        finally:
            backend.close()
        # requests reach the server concurrently, in any order
        received = sorted((tuple(r["prompt_ids"]), r["image_data"][0].tobytes()) for r in server.requests)
        sent.append((received, choices, cache.take_counts()))
    assert sent[0][2] == (0, 12) and sent[1][2] == sent[2][2] == (12, 0)
    assert len(cache) == 12 and sent[0][:2] == sent[1][:2] == sent[2][:2] and len(set(sent[0][0])) == 12

    planted = [1, 2, 3]
    cache._entries[prompt_key(requests[0])] = (np.asarray(planted, np.int32), np.ones(3, np.int32),
                                               cache._entries[prompt_key(requests[0])][2])
    server = FakeServer(tokenizer, known=COLORS)
    backend = make_backend(server, tokenizer, processor, verl_config, prompt_cache=cache)
    try:
        backend.choose_options(requests[:1], list(LETTERS))
    finally:
        backend.close()
    assert server.requests[0]["prompt_ids"] == planted


def test_fit_goes_on_through_failing_probe_questions(tmp_path, tokenizer, processor, caplog):
    """verl's fit with the karl trainer (tests/_support/trainer_harness.py) probing through
    RolloutProbeBackend: a corrupt image in the probe set and, at some refreshes, a replica failing
    every request of some entities. 24 questions (6 per aircraft), karl.mastery.min_answered_share 0.7, images
    within karl.mastery.probe_max_pixels:

    step 1 (train begin) and 7: the corrupt image only, 23 of 24 answered: the table is measured;
    step 3: F-16's 6 questions fail too, 17 of 24 (70.8%): the refresh succeeds, F-16 keeps its level;
    step 5: F-16's and MiG-29's fail, 11 of 24 (45.8%): the refresh fails, the previous table stays.
    """
    import logging

    from trainer_harness import (
        FakeRollout,
        FakeTQ,
        RecordingTracking,
        build_trainer,
        compose_base_config,
        make_config,
        patched_services,
    )

    probe_path = write_color_probe_set(tmp_path / "probe.parquet", per_entity=6, corrupt_row=2)
    config = make_config(compose_base_config(), tmp_path, mastery={
        "probe_data": probe_path, "probe_images_per_entity": 6, "refresh_every_steps": 2, "probe_timeout_s": 120.0,
        "min_answered_share": 0.7, "probe_max_pixels": 24 * 24}, total_epochs=2)
    config.actor_rollout_ref.rollout.name = "vllm"
    config.data.custom_cls = {"path": os.path.abspath(__file__), "name": "NoTorchvisionDataset"}
    broken_at = {3: {"F-16"}, 5: {"F-16", "MiG-29"}}

    class Server(FakeServer):
        async def generate(self, request_id, **kwargs):
            self.broken = broken_at.get(trainer.global_steps, set())
            return await super().generate(request_id, **kwargs)

    server = Server(tokenizer, known={"Su-30", "F-16"})
    tq = FakeTQ()
    with patched_services(tq), caplog.at_level(logging.WARNING, logger="karl_verl.integration.trainer"):
        trainer = build_trainer(config, tq, tokenizer)
        trainer.karl_probe_backend = lambda: make_backend(server, tokenizer, processor, config,
                                                          prompt_cache=trainer.karl_mastery.probe_prompt_cache())
        rollout = FakeRollout(tq, config, tokenizer)
        trainer.fit(rollout)

    assert trainer.global_steps == 9  # verl's fit ran its 8 steps
    # karl.mastery.probe_max_pixels reached every question: the 32x32 images went to the servers at 24x24.
    assert {r["image_data"][0].size for r in server.requests} == {(24, 24)}
    history = {r.step: r for r in trainer.karl_state.history}
    assert {step: r.status for step, r in history.items()} == {1: "ok", 3: "ok", 5: "failed", 7: "ok"}
    assert {step: r.num_skipped for step, r in history.items()} == {1: 1, 3: 7, 5: 13, 7: 1}
    assert history[1].skipped_by_kind == {"unreadable image": 1}
    assert history[5].skipped_by_kind == {"server error: RuntimeError": 12, "unreadable image": 1}
    assert history[3].carried_over == ["F-16"] and history[1].carried_over == []
    assert "TooFewAnswers" in history[5].error and "answered 11 of 24 questions (45.8%), below 0.7" in \
        history[5].error

    # the metrics of each refresh, logged with its step through verl's Tracking
    logged = dict(RecordingTracking.logged)
    for step, skipped, failed in [(1, 1, 0), (3, 7, 0), (5, 13, 1), (7, 1, 0)]:
        assert logged[step]["karl/refresh/skipped_questions"] == skipped, step
        assert logged[step]["karl/refresh/answered_share"] == pytest.approx((24 - skipped) / 24), step
        assert logged[step]["karl/refresh/failed"] == failed and logged[step]["karl/refresh/questions"] == 24
    assert all("karl/refresh/skipped_questions" not in logged[step] for step in (2, 4, 6, 8))
    # the first probe built the 23 readable questions' prompts; every later refresh took them all from the cache
    assert logged[1]["karl/refresh/prompt_cache_hit_share"] == 0.0
    assert all(logged[step]["karl/refresh/prompt_cache_hit_share"] == 1.0 for step in (3, 5, 7))
    assert all(logged[step]["karl/refresh/prompt_cache_questions"] == 23 for step in (1, 3, 5, 7))

    # levels: Su-30 and F-16 known (level 1), the others not (5); F-16 kept level 1 at the refreshes that
    # could not measure it (without the carry-over it would drop to the default level, 5)
    sent = {(s["step"], s["entity"]): s["level"] for s in rollout.scored if s["partition"] == "train"}
    assert {level for (step, entity), level in sent.items() if entity == "F-16"} == {1}
    assert any(step in (3, 4, 5, 6) for step, entity in sent if entity == "F-16")
    assert all(level == 5 for (_, entity), level in sent.items() if entity == "MiG-29")
    assert trainer.karl_state.table.get("F-16").epoch == 1  # measured again at step 7 (epoch 1)

    # one warning line per probe that skipped questions (never one per question), with the counts per reason
    lines = [r.getMessage() for r in caplog.records if r.name == "karl_verl.integration.trainer"]
    skipped_lines = [line for line in lines if "the mastery probe at step" in line]
    assert len(skipped_lines) == 3 and len([line for line in lines if "skipped" in line]) == 4  # + the failure
    assert "skipped 1 of 24 questions (95.8% answered, at least 0.7 needed" in skipped_lines[0]
    assert "1 unreadable image; skipped: 'Su-30-1::Su-30' (unreadable image); first error: " in skipped_lines[0]
    assert f"{probe_path}: row 2" in skipped_lines[0]
    assert "6 server error: RuntimeError, 1 unreadable image" in skipped_lines[1]
    assert "1 entities with no answered question kept their previous level: ['F-16']" in skipped_lines[1]
    (failed_line,) = [line for line in lines if "training goes on with the previous table" in line]
    assert "12 server error: RuntimeError, 1 unreadable image" in failed_line


def test_train_begin_skips_failed_questions_or_stops_below_the_share(verl_config, tokenizer, processor, questions,
                                                                     tmp_path):
    """At train begin there is no previous table: an entity with no answered question is not in the
    first table (the default level), and too few answers stop the run as a failed probe always did."""
    from karl_verl.integration.trainer import KarlTrainer

    def trainer_with(broken):
        config = copy.deepcopy(verl_config)
        config.algorithm.adv_estimator = "karl_grpo"
        config.trainer.default_local_dir = str(tmp_path)
        config.karl = {"mastery": {"probe_data": "in-memory", "probe_timeout_s": 60.0, "min_answered_share": 0.7}}
        trainer = KarlTrainer(config)
        trainer.karl_mastery.questions = questions  # 8: two per aircraft
        trainer.steps_per_epoch, trainer.global_steps = 2, 1
        server = FakeServer(tokenizer, known={"Su-30", "F-16"})
        server.broken = set(broken)
        trainer.karl_probe_backend = lambda: make_backend(server, tokenizer, processor, config)
        return trainer

    trainer = trainer_with({"F-16"})  # 6 of 8 answered
    trainer.on_train_begin()
    record = trainer.karl_state.history[-1]
    assert record.status == "ok" and record.num_skipped == 2 and record.carried_over == []
    assert "F-16" not in trainer.karl_state.table and trainer.karl_state.table.level_of("Su-30") == 1
    assert trainer.karl_consume_metrics()["karl/refresh/answered_share"] == 0.75

    with pytest.raises(RuntimeError, match=r"probe at train begin failed \(TooFewAnswers: the probe answered 4 of 8 "
                                           r"questions \(50.0%\), below 0.7 .*: 4 server error: RuntimeError"):
        trainer_with({"F-16", "MiG-29"}).on_train_begin()
