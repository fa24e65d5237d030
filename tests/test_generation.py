"""Chunked generation and backend selection."""

from __future__ import annotations

import pytest

from karl_verl.backends.base import BackendError, GenerationRequest, SamplingSettings
from karl_verl.generation import generate_all, load_generator


class Counter:
    def __init__(self):
        self.sizes = []

    def generate(self, requests, sampling):
        self.sizes.append(len(requests))
        return [[f"{r.messages[0]['content']}#{i}" for i in range(sampling.n)] for r in requests]


def _requests(n: int) -> list[GenerationRequest]:
    return [GenerationRequest(messages=[{"role": "user", "content": str(i)}]) for i in range(n)]


@pytest.mark.parametrize(("chunk_size", "sizes"), [(None, [7]), (3, [3, 3, 1]), (10, [7])])
def test_chunks_keep_order(chunk_size, sizes):
    generator = Counter()
    out = generate_all(generator, _requests(7), SamplingSettings(n=2), chunk_size=chunk_size, progress=False)
    assert generator.sizes == sizes
    assert out == [[f"{i}#0", f"{i}#1"] for i in range(7)]


def test_wrong_sample_count_is_an_error():
    class OneSample:
        def generate(self, requests, sampling):
            return [["x"] for _ in requests]

    with pytest.raises(BackendError, match="OneSample.generate: request 0: expected a list of 2 strings"):
        generate_all(OneSample(), _requests(2), SamplingSettings(n=2), progress=False)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        load_generator("some/model", "tensorrt")
