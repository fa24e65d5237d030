"""Fixtures for tests and CPU dry runs only (never imported by a training or evaluation code path).

* :mod:`karl_verl.testing.tiny_qwen3vl`: a tiny random Qwen3-VL (model, tokenizer, processor) built
  in code, with no download and no torchvision.
"""
