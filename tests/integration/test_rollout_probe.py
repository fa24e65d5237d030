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
import os
import re
import threading

import numpy as np
import pytest
from PIL import Image
from trainer_harness import compose_verl_config
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from karl_verl.backends.base import BackendError, GenerationRequest, SamplingSettings
from karl_verl.integration.rollout_probe import (
    ProbeCancelled,
    RolloutProbeBackend,
    ShortAnswerError,
)
from karl_verl.probe.questions import LETTERS, ProbeItem, build_questions
from karl_verl.probe.runner import run_probe
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

    def answer_distribution(self, prompt_ids, image):
        text = self.tokenizer.decode(prompt_ids)
        options = dict((name, letter) for letter, name in re.findall(r"^([ABCD])\. (.+)$", text, re.M))
        entity = next(e for e, color in COLORS.items() if image.getpixel((0, 0)) == color)
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
def test_short_answers_raise(verl_config, tokenizer, processor, questions, fault):
    server = FakeServer(tokenizer, known=COLORS)
    server.stop_reason = "aborted" if fault == "aborted" else "completed"
    server.reply = "" if fault == "empty" else "B"
    server.misalign = fault in ("misaligned", "off_option")
    backend = make_backend(server, tokenizer, processor, verl_config)
    try:
        with pytest.raises(ShortAnswerError):
            if fault == "misaligned":
                backend.option_logprobs([request_of(questions[0])], list(LETTERS))
            elif fault == "off_option":  # the constrained token is not one of the options
                backend.choose_options([request_of(questions[0])], list(LETTERS))
            elif fault == "aborted":
                backend.option_logprobs([request_of(questions[0])], list(LETTERS))
            else:
                backend.generate([request_of(questions[0])], SamplingSettings(n=1))
    finally:
        backend.close()


def test_cancel_stops_requests_in_flight(verl_config, tokenizer, processor, questions):
    server = FakeServer(tokenizer)
    server.hang = True
    backend = make_backend(server, tokenizer, processor, verl_config)
    outcome = {}

    def probe():
        try:
            backend.option_logprobs([request_of(q) for q in questions], list(LETTERS))
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=probe)
    thread.start()
    while len(server.requests) < len(questions):  # every question is in flight
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
