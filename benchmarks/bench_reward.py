"""Reward cost: the ``karl`` reward manager vs verl's ``naive`` one, and time per 100 KB response.

* Managers: 4,096 one-row DataProto samples (realistic ~300-character grounding responses),
  scored through ``run_single`` on the manager's event loop as verl's reward loop does; naive
  uses a trivial score function, so the ratio is the cost KARL's reward adds on top of decoding
  (target: karl at most 1.3x naive).
* 100 KB responses (far past the 1500-token cap): the released form-1 regex backtracks
  quadratically on long lines; the reader here is linear. Printed per response, next to a
  normal response.

    python benchmarks/bench_reward.py
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import time_side_by_side  # noqa: E402

GT = "<|object_ref_start|>Sukhoi Su-30<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"


def _response(rng: random.Random) -> str:
    x, y = rng.randint(0, 600), rng.randint(0, 600)
    return (f"<think>The image shows several aircraft; the one with canards and twin tails near the "
            f"{rng.choice(['left', 'right', 'top'])} is the Su-30, so its box is around there.</think>"
            f"<answer>({x},{y}),({x + rng.randint(10, 300)},{y + rng.randint(10, 300)})</answer>")


def adversarial_100kb() -> dict[str, str]:
    size = 100_000
    return {
        "repeated '(1,' on one line": ("(1," * (size // 3))[:size],
        "boxes in one long line": ("(12, 40) and then " * (size // 18))[:size],
        "digits": "<answer>" + "9" * size + "</answer>",
        "prose + box at the end": "<think>" + "lorem ipsum " * (size // 12) + "</think><answer>(1,2),(3,4)</answer>",
        "unbalanced tags": "<answer><think>" * (size // 15),
    }


def bench_long_responses(repeats: int = 3) -> dict[str, float]:
    from karl_verl.reward import compute_score

    normal = _response(random.Random(0))
    cases = {"normal (~300 chars)": normal, **adversarial_100kb()}
    times = time_side_by_side({name: (lambda t=text: compute_score("kvg", t, GT)) for name, text in cases.items()},
                              repeats=repeats)
    print(f"\n{'response':<32}{'ms per response':>16}")
    for name, seconds in times.items():
        print(f"{name:<32}{seconds * 1000:>16.2f}")
    return {"reward_ms_per_100kb_worst": max(v for k, v in times.items() if k in adversarial_100kb()) * 1000}


def bench_managers(samples: int = 4096, repeats: int = 3) -> dict[str, float]:
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    rng = random.Random(0)
    encoded = [tokenizer(_response(rng), add_special_tokens=False)["input_ids"] for _ in range(samples)]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    rows = DataProto.from_dict(
        tensors={
            "prompts": torch.full((samples, 4), pad),
            "responses": torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded]),
            "attention_mask": torch.tensor([[1] * 4 + [1] * len(ids) + [0] * (width - len(ids)) for ids in encoded]),
        },
        non_tensors={
            "data_source": np.array(["kvg/aircraft"] * samples, dtype=object),
            "reward_model": np.array([{"ground_truth": GT}] * samples, dtype=object),
            "extra_info": np.array([{"knowledge_level": rng.randint(1, 5)} for _ in range(samples)], dtype=object),
        },
    )
    singles = [rows[i : i + 1] for i in range(samples)]

    def config(name: str, path: str | None):
        return OmegaConf.create({"reward": {"reward_manager": {"source": "register", "name": name},
                                            "custom_reward_function": {"path": path, "name": "trivial"},
                                            "sandbox_fusion": None}})

    trivial = Path(__file__).parent / "_trivial_score.py"
    naive = load_reward_manager(config("naive", str(trivial)), tokenizer)
    karl = load_reward_manager(config("karl", None), tokenizer)

    def score_all(manager):
        async def gather():
            return await asyncio.gather(*(manager.run_single(item) for item in singles))

        return manager.loop.run_until_complete(gather())

    times = time_side_by_side({"naive": lambda: score_all(naive), "karl": lambda: score_all(karl)}, repeats=repeats)
    ratio = times["karl"] / times["naive"]
    print(f"\n{samples} samples through run_single: naive {times['naive']:.2f} s, karl {times['karl']:.2f} s, "
          f"karl/naive = {ratio:.2f}x (target <= 1.3x)")
    return {"reward_manager_karl_over_naive": ratio}


def main(repeats: int = 3) -> dict[str, float]:
    figures = bench_long_responses(repeats)
    figures.update(bench_managers(repeats=repeats))
    return figures


if __name__ == "__main__":
    main()
