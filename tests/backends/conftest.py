"""Shared tiny-model fixtures for the backend tests (built once per session: ~0.1 s)."""

from __future__ import annotations

import pytest

from karl_verl.testing.tiny_qwen3vl import build_tiny_model, build_tiny_processor, build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_processor():
    return build_tiny_processor(build_tiny_tokenizer())


@pytest.fixture(scope="session")
def tiny_model(tiny_processor):
    return build_tiny_model(seed=0, tokenizer=tiny_processor.tokenizer)
