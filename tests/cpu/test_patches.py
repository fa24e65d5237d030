"""The three verl spots without an extension point (karl_verl/cpu/patches.py)."""

from __future__ import annotations

import importlib.util
import json
import socket
import types

import pytest
import torch
import torch.distributed as dist

from karl_verl.cpu import patches
from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer, load_tiny_processor, save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("cpu:gloo,cpu:gloo", "gloo"),  # what verl builds on the cpu platform
        (" cpu:gloo , cpu:gloo ", "gloo"),
        ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl"),  # a GPU run's string is left alone
        ("cpu:gloo,cuda:nccl,cpu:gloo", "cpu:gloo,cuda:nccl"),
        ("gloo", "gloo"),
        ("nccl", "nccl"),
        (None, None),
    ],
)
def test_collapse_duplicate_backend(backend, expected):
    assert patches.collapse_duplicate_backend(backend) == expected


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_single_process_gloo_group_with_verls_backend_string(monkeypatch):
    # Restores torch's function after the test: the fix must not leak into other tests.
    monkeypatch.setattr(dist, "init_process_group", dist.init_process_group)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="(?i)duplicate"):  # why the fix exists: torch refuses verl's string
        dist.init_process_group(
            backend="cpu:gloo,cpu:gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    assert not dist.is_initialized()
    patches.install_gloo_backend_fix()
    patches.install_gloo_backend_fix()  # idempotent: wrapped once
    assert dist.init_process_group.__wrapped__.__name__ == "init_process_group"
    assert not hasattr(dist.init_process_group.__wrapped__, "_karl_cpu_backend_fix")
    dist.init_process_group(
        backend="cpu:gloo,cpu:gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
        tensor = torch.tensor([1.0, 2.0])
        dist.all_reduce(tensor)
        assert tensor.tolist() == [1.0, 2.0]
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


def _image_token_count(processor, image) -> int:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the car."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return int((inputs["input_ids"] == image_token).sum())


def test_qwen3vl_processor_built_without_torchvision(tiny_checkpoint):
    from PIL import Image
    from verl.utils.tokenizer import hf_processor

    if importlib.util.find_spec("torchvision") is None:
        assert hf_processor(str(tiny_checkpoint)) is None  # what verl alone gives without torchvision
    processor = patches.processor_without_torchvision(str(tiny_checkpoint), hf_processor)
    assert processor is not None
    # The two bindings verl's hf_processor adds for Qwen3-VL.
    assert processor.config.model_type == "qwen3_vl"
    assert isinstance(processor.get_rope_index, types.MethodType) and processor.get_rope_index.__self__ is processor
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    expected = _image_token_count(load_tiny_processor(tiny_checkpoint), image)
    assert expected > 1
    assert _image_token_count(processor, image) == expected
    # get_rope_index works on the bound processor: M-RoPE positions for text plus one image.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    mm_types = (inputs["input_ids"] == processor.config.image_token_id).long()
    positions, _ = processor.get_rope_index(
        inputs["input_ids"], mm_types, image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
    )
    assert positions.shape == (3, 1, inputs["input_ids"].shape[1])


class _RecordingProcessorLoader:
    """Stands in for verl's hf_processor: records the call, returns a fixed answer."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def __call__(self, name_or_path, **kwargs):
        self.calls.append((name_or_path, kwargs))
        return self.answer


def test_processor_fix_changes_nothing_outside_its_precondition(tmp_path, tiny_checkpoint):
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    build_tiny_tokenizer().save_pretrained(text_only)
    (text_only / "config.json").write_text(json.dumps({"model_type": "qwen3"}), encoding="utf-8")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    for path in (str(text_only), str(no_config), text_only):
        loader = _RecordingProcessorLoader(None)
        assert patches.processor_without_torchvision(path, loader, trust_remote_code=False) is None
        assert loader.calls == [(path, {"trust_remote_code": False})]
    # Whatever verl's loader built is kept as is, Qwen3-VL or not.
    sentinel = object()
    assert patches.processor_without_torchvision(str(tiny_checkpoint), _RecordingProcessorLoader(sentinel)) is sentinel
    # A name that is not a local path (a hub id) is not looked at.
    assert patches.processor_without_torchvision(12, _RecordingProcessorLoader(None)) is None


def test_install_processor_fix_routes_verls_model_config(monkeypatch, tiny_checkpoint):
    from verl.workers.config import model as model_config

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("with torchvision the fix installs nothing")
    monkeypatch.setattr(model_config, "hf_processor", model_config.hf_processor)
    assert model_config.hf_processor(str(tiny_checkpoint)) is None
    patches.install_processor_fix()
    patched = model_config.hf_processor
    patches.install_processor_fix()
    assert model_config.hf_processor is patched  # idempotent
    processor = model_config.hf_processor(str(tiny_checkpoint), trust_remote_code=False)
    assert processor is not None and processor.config.model_type == "qwen3_vl"


def test_unpinned_offload_policy(monkeypatch):
    from torch.distributed.fsdp import CPUOffloadPolicy
    from verl.workers.engine.fsdp import transformer_impl

    monkeypatch.setattr(transformer_impl, "CPUOffloadPolicy", transformer_impl.CPUOffloadPolicy)
    assert transformer_impl.CPUOffloadPolicy(pin_memory=True).pin_memory is True
    patches.install_unpinned_offload_policy()
    patched = transformer_impl.CPUOffloadPolicy
    patches.install_unpinned_offload_policy()
    assert transformer_impl.CPUOffloadPolicy is patched  # idempotent: not subclassed twice
    policy = transformer_impl.CPUOffloadPolicy(pin_memory=True)  # what verl's forward-only engine asks for
    assert isinstance(policy, CPUOffloadPolicy) and policy.pin_memory is False
    assert transformer_impl.CPUOffloadPolicy().pin_memory is False


_POLL_PROBE = """
import os, sys
if sys.argv[1] == "cpu":
    from karl_verl.cpu import environment
    os.environ.update(environment())
import karl_verl  # installs the registration hooks, as verl's entry point does in a run
from omegaconf import OmegaConf
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
print(ReplayBuffer("sync", OmegaConf.create({}), None, "drop", OmegaConf.create({})).poll_interval)
"""


@pytest.mark.parametrize(("layer", "expected"), [("cpu", patches.CPU_REPLAY_POLL_INTERVAL_S), ("gpu", 2.0)])
def test_the_trainer_process_of_a_cpu_run_polls_for_rollouts_every_fraction_of_a_second(layer, expected):
    """verl's replay buffer sleeps 2 s between looks at finished rollouts; a CPU step generates in
    1-3 s, so each step waited for the next tick. The CPU layer shortens it in the trainer's process
    (installed when verl's v1 trainer package loads); a run without the CPU layer keeps verl's 2 s."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("KARL_VERL_CPU", "VERL_PLATFORM")}
    result = subprocess.run([sys.executable, "-c", _POLL_PROBE, layer], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == expected

