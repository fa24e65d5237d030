"""karl_grpo vs verl's compute_grpo_outcome_advantage at 16,384 samples x 256 tokens on CPU.

Target (issue: plugin core): karl_grpo at least 5x faster with equal results. Three reward
layouts: random normal rewards; KARL's outcome values with many constant groups (all-fail /
all-success groups are common in real runs); the same with per-level weights switched on.

    python benchmarks/bench_advantage.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import time_side_by_side  # noqa: E402


def make_batch(kind: str, samples: int = 16384, tokens: int = 256, group: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    index = np.array([f"uid-{i // group}" for i in range(samples)], dtype=object)
    mask = torch.ones(samples, tokens)
    if kind == "random":
        rewards = torch.from_numpy(rng.standard_normal((samples, tokens)).astype(np.float32))
    else:
        rewards = torch.zeros(samples, tokens)
        values = np.repeat(rng.choice([-0.6, 0.4, 1.0, 2.0], samples // group), group)  # constant groups
        mixed = rng.random(samples // group) < 0.5
        noisy = rng.choice([-0.6, 0.4, 1.0, 1.7, 2.0], samples)
        values = np.where(np.repeat(mixed, group), noisy, values)
        rewards[:, -1] = torch.from_numpy(values.astype(np.float32))
    levels = np.repeat(rng.integers(1, 6, samples // group), group)
    return rewards, mask, index, levels


WEIGHTS = {"karl": {"alpha_plus": [0.65, 0.85, 1.0, 1.2, 1.4], "alpha_minus": [1.4, 1.2, 1.0, 0.85, 0.65]}}


def time_layout(kind: str, repeats: int) -> tuple[dict[str, float], float]:
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    from karl_verl.advantage import compute_karl_grpo_advantage

    rewards, mask, index, levels = make_batch(kind)
    reference, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    ours, _ = compute_karl_grpo_advantage(rewards, mask, index)
    times = time_side_by_side({
        "verl": lambda: compute_grpo_outcome_advantage(rewards, mask, index),
        "karl": lambda: compute_karl_grpo_advantage(rewards, mask, index),
        "karl_weighted": lambda: compute_karl_grpo_advantage(rewards, mask, index, config=WEIGHTS,
                                                             mastery_levels=levels),
    }, repeats=repeats)
    return times, float((reference - ours).abs().max())


def main(repeats: int = 5) -> dict[str, float]:
    figures: dict[str, float] = {}
    print(f"{'rewards':<36}{'verl grpo (s)':>14}{'karl_grpo (s)':>15}{'speed-up':>10}{'max |diff|':>12}")
    for kind, label in (("random", "random normal"), ("karl", "KARL outcome values")):
        times, diff = time_layout(kind, repeats)
        speedup = times["verl"] / times["karl"]
        weighted = times["verl"] / times["karl_weighted"]
        print(f"{label:<36}{times['verl']:>14.3f}{times['karl']:>15.3f}{speedup:>9.1f}x{diff:>12.1e}")
        print(f"{label + ' + level weights':<36}{times['verl']:>14.3f}{times['karl_weighted']:>15.3f}{weighted:>9.1f}x")
        figures[f"advantage_speedup_{kind}"] = speedup
        figures[f"advantage_speedup_{kind}_weighted"] = weighted
        figures[f"advantage_max_diff_{kind}"] = diff
    return figures


if __name__ == "__main__":
    main()
