"""HFBackend on the tiny Qwen3-VL (CPU): shapes, seeding, and option scores against a manual forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from karl_verl.backends.base import BackendError, GenerationRequest, SamplingSettings
from karl_verl.backends.hf import HFBackend, option_token_ids
from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

LETTERS = ["A", "B", "C", "D"]


def _requests(count: int = 5) -> list[GenerationRequest]:
    # Different image sizes and prompt lengths, so batches really are left-padded.
    return [
        GenerationRequest(
            [{"role": "user", "content": f"<image>What is the car in the image?{' x' * i}"}],
            [Image.new("RGB", (40 + 9 * i, 36 + 7 * i), (30 * i % 255, 90, 160))],
        )
        for i in range(count)
    ]


@pytest.fixture()
def backend(tiny_model, tiny_processor):
    return HFBackend(tiny_model, tiny_processor, batch_size=3, progress=False)


def test_generate_shapes(backend):
    texts = backend.generate(_requests(4), SamplingSettings(max_new_tokens=3, n=2))
    assert len(texts) == 4 and all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in texts)
    assert backend.generate([], SamplingSettings(max_new_tokens=3)) == []


def test_generate_is_deterministic_for_a_seed_and_keeps_global_rng(backend):
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=6, n=2, seed=5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = backend.generate(_requests(3), sampling)
    assert torch.equal(torch.rand(1), before)  # caller's RNG stream unaffected
    assert backend.generate(_requests(3), sampling) == first
    other = backend.generate(_requests(3), SamplingSettings(temperature=1.0, max_new_tokens=6, n=2, seed=6))
    assert other != first


def test_greedy_generation_does_not_depend_on_batching(tiny_model, tiny_processor):
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=4)
    batched = HFBackend(tiny_model, tiny_processor, batch_size=5, progress=False).generate(_requests(), sampling)
    single = HFBackend(tiny_model, tiny_processor, batch_size=1, progress=False).generate(_requests(), sampling)
    assert batched == single


def test_option_logprobs_equal_a_manual_forward_at_the_answer_position(backend, tiny_model, tiny_processor):
    requests = _requests()
    scores = backend.option_logprobs(requests, LETTERS)
    assert scores.shape == (5, 4) and scores.dtype == np.float64
    ids = option_token_ids(tiny_processor.tokenizer, LETTERS)
    for i, request in enumerate(requests):
        question = request.messages[0]["content"].removeprefix("<image>")
        text = tiny_processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert text.endswith("<|im_start|>assistant\n")
        inputs = tiny_processor(text=[text], images=request.images, return_tensors="pt")
        with torch.no_grad():
            logits = tiny_model(**inputs).logits[0, -1]
        expected = torch.log_softmax(logits.float(), dim=-1)[ids].numpy()
        np.testing.assert_allclose(scores[i], expected, atol=1e-5)


def test_option_logprobs_edge_cases(backend):
    assert backend.option_logprobs([], LETTERS).shape == (0, 4)
    with pytest.raises(BackendError, match="not a single token"):
        backend.option_logprobs(_requests(1), ["A", "Boeing 747"])
    with pytest.raises(BackendError, match="distinct"):
        backend.option_logprobs(_requests(1), ["A", "A"])
    with pytest.raises(BackendError, match="request 1: 0 <image>"):
        backend.option_logprobs(
            [_requests(1)[0], GenerationRequest([{"role": "user", "content": "no image"}], [Image.new("RGB", (8, 8))])],
            LETTERS,
        )


def test_from_pretrained_on_a_tiny_checkpoint(tmp_path, backend):
    directory = save_tiny_checkpoint(tmp_path / "tiny")
    loaded = HFBackend.from_pretrained(directory, device="cpu", batch_size=2, progress=False)
    assert loaded.device.type == "cpu" and next(loaded.model.parameters()).dtype == torch.float32
    np.testing.assert_allclose(
        loaded.option_logprobs(_requests(2), LETTERS), backend.option_logprobs(_requests(2), LETTERS), atol=1e-6
    )
