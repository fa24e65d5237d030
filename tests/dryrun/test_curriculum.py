"""The prompt curriculum (karl.curriculum) through verl's real main_ppo on CPU: weights, metrics, resume.

The runs are conftest's ``curriculum_runs``: one 4-step run (2 epochs of 2 steps, checkpoints at steps
2 and 4, a probe refresh at step 3), and the same run killed after step 3 and resumed from its step-2
checkpoint; inputs (data, warmed-up tiny model) are the dry run's.
"""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from karl_verl.boxes import entity_of
from karl_verl.integration.curriculum import CURRICULUM_FILE, LOADER_SAMPLER_KEY

pytestmark = pytest.mark.slow

N = 4  # rollouts per prompt (karl_kvg)
BATCH = 4


def _prompts(rollout_dir: Path, step: int) -> list[str]:
    """The ground truths of a step's rollouts (one prompt = one ground truth, n times), sorted."""
    return sorted(json.loads(line)["gts"] for line in (rollout_dir / f"{step}.jsonl").read_text().splitlines())


def _without_counts(state: dict) -> dict:
    # The rollouts after a resume are sampled afresh, so their outcomes (the band-pass counts) may differ.
    return {key: value for key, value in state.items() if key != "counts"}


def test_drawn_prompts_follow_the_level_weights(curriculum_runs):
    runs = curriculum_runs
    levels, weights = runs.levels, runs.weights
    data = [record["data"] for record in runs.full.steps]
    assert [int(record["step"]) for record in runs.full.steps] == [1, 2, 3, 4]
    for step, metrics in enumerate(data, start=1):
        drawn = [metrics[f"karl/curriculum/level_{k}/drawn"] for k in range(1, 6)]
        assert sum(drawn) == BATCH
        # The trainer tags each rollout with the level the curriculum drew it at.
        assert [metrics[f"karl/level_{k}/count"] for k in range(1, 6)] == [N * d for d in drawn]
        assert metrics["karl/curriculum/fallback"] == 0
        for k in range(1, 6):
            if metrics[f"karl/curriculum/level_{k}/weight_share"] == 0:  # weight 0, or no entity at that level
                assert drawn[k - 1] == 0, (step, k)
    # Epoch 1 draws from the starting table: levels 2 and 4 weigh 0, so Mini Cooper and Airbus A380 never come.
    for step in (1, 2):
        entities = {entity_of(gt) for gt in _prompts(runs.rollouts("full"), step)}
        assert entities <= {e for e, k in levels.items() if weights[k - 1] > 0}, entities
        assert data[step - 1]["karl/curriculum/level_2/drawn"] == data[step - 1]["karl/curriculum/level_4/drawn"] == 0
    # drawn_epoch adds up within an epoch and starts again with the next; re-weights at train begin,
    # at the refresh before step 3 and at both epoch starts.
    assert [sum(d[f"karl/curriculum/level_{k}/drawn_epoch"] for k in range(1, 6)) for d in data] == [4, 8, 4, 8]
    assert [d["karl/curriculum/epoch"] for d in data] == [0, 0, 1, 1]
    assert [d["karl/curriculum/reweights"] for d in data] == [2, 0, 2, 0]


def test_the_state_is_saved_with_each_checkpoint_and_agrees_with_verls_data_pt(curriculum_runs):
    checkpoints = curriculum_runs.checkpoints("full")
    for step, position in ((2, 8), (4, 8)):
        folder = checkpoints / f"global_step_{step}"
        state = json.loads((folder / CURRICULUM_FILE).read_text())
        loader_state = torch.load(folder / "data.pt", weights_only=False)
        assert loader_state[LOADER_SAMPLER_KEY] == state
        assert state["epoch"] == (step - 1) // 2 and state["position"] == position
    counts = json.loads((checkpoints / "global_step_4" / CURRICULUM_FILE).read_text())["counts"]["counts"]
    assert sum(s + f for s, f in counts.values()) == 4 * BATCH * N  # every rollout's acc@0.5 was counted
    drawn = Counter(entity_of(gt) for step in range(1, 5) for gt in _prompts(curriculum_runs.rollouts("full"), step))
    assert {e: s + f for e, (s, f) in counts.items()} == dict(drawn)


def test_a_run_resumed_after_a_crash_draws_the_same_prompts_as_the_uninterrupted_one(curriculum_runs):
    runs = curriculum_runs
    assert [int(record["step"]) for record in runs.resumed.steps] == [3, 4]
    for step in (3, 4):
        assert _prompts(runs.rollouts("resumed"), step) == _prompts(runs.rollouts("full"), step)
    keys = [f"karl/curriculum/level_{k}/drawn" for k in range(1, 6)] + ["karl/curriculum/reweights"]
    assert [{k: r["data"][k] for k in keys} for r in runs.resumed.steps] == [
        {k: r["data"][k] for k in keys} for r in runs.full.steps[2:]]
    ours = json.loads((runs.checkpoints("resumed") / "global_step_4" / CURRICULUM_FILE).read_text())
    reference = json.loads((runs.checkpoints("full") / "global_step_4" / CURRICULUM_FILE).read_text())
    assert _without_counts(ours) == _without_counts(reference)
