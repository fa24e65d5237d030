"""Stage 1 of the experiment: supervised warm-up of the tiny model on the world's known entities (CPU).

Teaches the answer format, the grounding of known entities and their 4-choice recognition, from
``warmup.jsonl`` of :func:`karl_verl.world.build_world`. Runs in the calling process with plain
PyTorch (AdamW, one example per forward, gradients summed over a mini-batch); the checkpoint it
saves is what ``main_ppo`` loads. On the tiny Qwen3-VL a step of 8 examples takes ~0.1 s on 2 cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karl_verl.backends.base import GenerationRequest, request_images, structured_messages
from karl_verl.backends.hf import response_logprobs


@dataclass(frozen=True)
class WarmupExample:
    kind: str
    entity: str
    inputs: dict[str, torch.Tensor]
    target_ids: list[int]


def encode_request(processor: Any, request: GenerationRequest) -> dict[str, torch.Tensor]:
    """The processor's tensors for a one-turn request, prompt ending with the assistant header."""
    messages = structured_messages(request)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = request_images(request)
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


def load_warmup_examples(path: str | Path, processor: Any) -> list[WarmupExample]:
    """Read ``warmup.jsonl`` (images relative to its folder's ``images/``) and encode every example."""
    path = Path(path)
    tokenizer = processor.tokenizer
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            image = path.parent / "images" / record["image"]
            request = GenerationRequest(messages=[{"role": "user", "content": record["prompt"]}],
                                        images=[image.read_bytes()])
            target = tokenizer(record["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            examples.append(WarmupExample(record["kind"], record["entity"], encode_request(processor, request),
                                          target))
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{path}, line {number}: not a warm-up example ({exc})") from exc
    return examples


def supervised_steps(model: Any, examples: list[WarmupExample], *, steps: int, lr: float, batch_size: int = 1,
                     seed: int = 0, progress: bool = True, desc: str = "warm-up") -> list[float]:
    """``steps`` AdamW steps of token-mean NLL on the examples' targets; the loss per step.

    Examples are drawn without replacement in a seeded order (a new permutation each pass).
    """
    from tqdm import tqdm

    if not examples:
        raise ValueError("supervised_steps: no examples")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress):
        optimizer.zero_grad()
        total = 0.0
        for _ in range(batch_size):
            if not order:
                order = list(rng.permutation(len(examples)))
            example = examples[order.pop()]
            loss = -response_logprobs(model, example.inputs, example.target_ids).mean() / batch_size
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total)
    model.eval()
    return losses
