"""The experiment's warm-up: world examples encode through the processor and supervised steps fit them (CPU)."""

from __future__ import annotations

import pytest
import torch

from karl_verl.backends.hf import response_logprobs
from karl_verl.experiment.warmup import load_warmup_examples, supervised_steps
from karl_verl.testing.tiny_qwen3vl import TinySize, build_tiny_model, build_tiny_processor
from karl_verl.world import WorldConfig, build_world


def test_supervised_steps_lower_the_examples_loss(tmp_path):
    world = build_world(WorldConfig(train_images=4, val_images=4, warmup_images=6, warmup_probe_per_entity=1,
                                    probe_images_per_entity=1), tmp_path)
    processor = build_tiny_processor()
    examples = load_warmup_examples(world.files["warmup"], processor)[:6]
    assert {e.kind for e in examples} <= {"grounding", "probe"}
    model = build_tiny_model(seed=0, tokenizer=processor.tokenizer)

    def loss() -> float:
        with torch.no_grad():
            return float(sum(-response_logprobs(model, e.inputs, e.target_ids).mean() for e in examples))

    before = loss()
    losses = supervised_steps(model, examples, steps=30, lr=3e-3, batch_size=2, progress=False)
    assert len(losses) == 30 and loss() < 0.5 * before


def test_a_bad_warmup_line_names_file_and_line(tmp_path):
    path = tmp_path / "warmup.jsonl"
    path.write_text('{"kind": "probe", "prompt": "<image>x", "image": "missing.png", "entity": "A", "target": "B"}\n')
    with pytest.raises(ValueError, match=r"warmup.jsonl, line 1"):
        load_warmup_examples(path, build_tiny_processor())


def test_tiny_size_defaults_are_the_fixture_and_larger_sizes_build():
    tokenizer = build_tiny_processor().tokenizer
    default = build_tiny_model(seed=0, tokenizer=tokenizer)
    same = build_tiny_model(seed=0, tokenizer=tokenizer, size=TinySize())
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), same.state_dict().values(),
                                                 strict=True))
    wider = build_tiny_model(seed=0, tokenizer=tokenizer, size=TinySize(hidden_size=128, num_layers=3))
    assert sum(p.numel() for p in wider.parameters()) > 2 * sum(p.numel() for p in default.parameters())
    with pytest.raises(ValueError, match="hidden_size"):
        TinySize(hidden_size=40)
