"""Using karl-verl's parts from your own code or a custom verl job (runs on CPU in seconds).

    python examples/custom_verl_job.py

1. score responses with the KA-IoU reward (the function verl calls as a custom score function);
2. build a mastery table from probe accuracies and save it;
3. compute karl_grpo advantages with per-sample mastery levels, as the ``karl`` trainer does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import karl_verl  # noqa: F401  (registers "karl" and "karl_grpo" in verl's registries)
from karl_verl.advantage import compute_karl_grpo_advantage
from karl_verl.config import RewardConfig
from karl_verl.mastery import MasteryTable
from karl_verl.reward import KarlReward, compute_score

GROUND_TRUTH = "<|object_ref_start|>Sukhoi Su-30<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"
RESPONSES = [
    "<think>The twin-tail fighter on the left.</think><answer>(100,100),(300,280)</answer>",
    "<think>Probably the right one.</think><answer>(500,500),(600,600)</answer>",
    "I am not sure.",
    "<think>Left.</think><answer>(110,90),(310,300)</answer>",
]


def main() -> None:
    # 1. The paper's reward for an entity the model barely knows (level 4) and knows well (level 1).
    for level in ("mostly incorrect", "completely correct"):
        scores = [compute_score("kvg/aircraft", r, GROUND_TRUTH, {"knowledge_level": level})["score"]
                  for r in RESPONSES]
        print(f"KA-IoU + format, {level:<18}: {[round(s, 3) for s in scores]}")

    # 2. A mastery table from probe accuracies; the scorer reads levels from it by entity.
    table = MasteryTable.from_scores({"Sukhoi Su-30": 0.22, "Boeing 747": 0.9}, epoch=0)
    path = table.save(Path(tempfile.mkdtemp()) / "mastery.json")
    scorer = KarlReward(RewardConfig(preset="v1"), table=MasteryTable.load(path))
    result = scorer("kvg/aircraft", RESPONSES[0], GROUND_TRUTH, {})
    print(f"v1 preset with the table: score {result['score']:.3f}, level {result['knowledge_level']}, "
          f"IoU {result['iou']:.3f}")

    # 3. karl_grpo on one group of 4 samples (one prompt), weighted by the entity's level.
    rewards = torch.zeros(4, 8)
    rewards[:, -1] = torch.tensor([scorer("kvg", r, GROUND_TRUTH, {})["score"] for r in RESPONSES])
    config = {"karl": {"alpha_plus": [0.65, 0.85, 1.0, 1.2, 1.4], "alpha_minus": [1.4, 1.2, 1.0, 0.85, 0.65]}}
    advantages, _ = compute_karl_grpo_advantage(rewards, torch.ones(4, 8), np.array(["prompt-0"] * 4, dtype=object),
                                                config=config, mastery_levels=[4, 4, 4, 4])
    print(f"karl_grpo advantages (level 4 weights): {[round(a, 3) for a in advantages[:, 0].tolist()]}")


if __name__ == "__main__":
    main()
