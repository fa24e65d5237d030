"""The prompt curriculum (karl.curriculum) through verl's real main_ppo on CPU: weights, metrics, resume.

One 4-step run (2 epochs of 2 steps, checkpoints at steps 2 and 4, a probe refresh at step 3) and
one run resuming from its step-2 checkpoint; inputs (data, warmed-up tiny model) are the dry run's.
"""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from karl_verl.boxes import entity_of
from karl_verl.dryrun.pipeline import DryRunOptions, train, training_overrides
from karl_verl.integration.curriculum import CURRICULUM_FILE, LOADER_SAMPLER_KEY
from karl_verl.mastery import LEVEL_NAMES

pytestmark = pytest.mark.slow

#: The table the run starts from (refresh_every_epochs=1 re-probes before step 3).
LEVELS = {"Fiat 500": 1, "Mini Cooper": 2, "Mallard": 3, "Barn Owl": 3, "Airbus A380": 4, "Blue Jay": 5,
          "F-16 Fighting Falcon": 5}
WEIGHTS = (1.0, 0.0, 1.0, 0.0, 1.0)
N = 4  # rollouts per prompt (karl_kvg)
BATCH = 4



def _prompts(rollout_dir: Path, step: int) -> list[str]:
    """The ground truths of a step's rollouts (one prompt = one ground truth, n times), sorted."""
    return sorted(json.loads(line)["gts"] for line in (rollout_dir / f"{step}.jsonl").read_text().splitlines())


def _without_counts(state: dict) -> dict:
    # The rollouts after a resume are sampled afresh, so their outcomes (the band-pass counts) may differ.
    return {key: value for key, value in state.items() if key != "counts"}


@pytest.fixture(scope="module")
def curriculum_runs(dry_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("curriculum")
    table = workdir / "table.json"
    table.write_text(json.dumps({e: {"knowledge_category": LEVEL_NAMES[k - 1]} for e, k in LEVELS.items()}))
    options = DryRunOptions(workdir=workdir, progress=False)
    paths = dry_run.paths
    curriculum = ["karl.curriculum.enable=true", f"karl.curriculum.level_weights={list(WEIGHTS)}",
                  "karl.curriculum.max_success_rate=0.99", "karl.curriculum.min_observations=4",
                  f"karl.mastery.table_path={table}"]
    full = train(options, paths, "full", [
        *training_overrides(options, paths, checkpoints=workdir / "checkpoints", hydra_dir=workdir / "hydra",
                            total_epochs=2),
        *curriculum, f"trainer.rollout_data_dir={workdir / 'rollouts'}"], 4)
    assert full.ok, full.log_tail()
    resumed = train(options, paths, "resumed", [
        *training_overrides(options, paths, checkpoints=workdir / "resumed_checkpoints",
                            hydra_dir=workdir / "hydra_resumed", total_epochs=2),
        *curriculum, f"trainer.rollout_data_dir={workdir / 'resumed_rollouts'}", "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={workdir / 'checkpoints' / 'global_step_2'}"], 2)
    assert resumed.ok, resumed.log_tail()
    return workdir, full, resumed


def test_drawn_prompts_follow_the_level_weights(curriculum_runs):
    workdir, full, _ = curriculum_runs
    data = [record["data"] for record in full.steps]
    assert [int(record["step"]) for record in full.steps] == [1, 2, 3, 4]
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
        entities = {entity_of(gt) for gt in _prompts(workdir / "rollouts", step)}
        assert entities <= {e for e, k in LEVELS.items() if WEIGHTS[k - 1] > 0}, entities
        assert data[step - 1]["karl/curriculum/level_2/drawn"] == data[step - 1]["karl/curriculum/level_4/drawn"] == 0
    # drawn_epoch adds up within an epoch and starts again with the next; re-weights at train begin,
    # at the refresh before step 3 and at both epoch starts.
    assert [sum(d[f"karl/curriculum/level_{k}/drawn_epoch"] for k in range(1, 6)) for d in data] == [4, 8, 4, 8]
    assert [d["karl/curriculum/epoch"] for d in data] == [0, 0, 1, 1]
    assert [d["karl/curriculum/reweights"] for d in data] == [2, 0, 2, 0]


def test_the_state_is_saved_with_each_checkpoint_and_agrees_with_verls_data_pt(curriculum_runs):
    workdir, _, _ = curriculum_runs
    for step, position in ((2, 8), (4, 8)):
        folder = workdir / "checkpoints" / f"global_step_{step}"
        state = json.loads((folder / CURRICULUM_FILE).read_text())
        loader_state = torch.load(folder / "data.pt", weights_only=False)
        assert loader_state[LOADER_SAMPLER_KEY] == state
        assert state["epoch"] == (step - 1) // 2 and state["position"] == position
    counts = json.loads((workdir / "checkpoints" / "global_step_4" / CURRICULUM_FILE).read_text())["counts"]["counts"]
    assert sum(s + f for s, f in counts.values()) == 4 * BATCH * N  # every rollout's acc@0.5 was counted
    drawn = Counter(entity_of(gt) for step in range(1, 5) for gt in _prompts(workdir / "rollouts", step))
    assert {e: s + f for e, (s, f) in counts.items()} == dict(drawn)


def test_a_resumed_run_draws_the_same_prompts_as_the_uninterrupted_one(curriculum_runs):
    workdir, full, resumed = curriculum_runs
    assert [int(record["step"]) for record in resumed.steps] == [3, 4]
    for step in (3, 4):
        assert _prompts(workdir / "resumed_rollouts", step) == _prompts(workdir / "rollouts", step)
    keys = [f"karl/curriculum/level_{k}/drawn" for k in range(1, 6)] + ["karl/curriculum/reweights"]
    assert [{k: r["data"][k] for k in keys} for r in resumed.steps] == [
        {k: r["data"][k] for k in keys} for r in full.steps[2:]]
    ours = json.loads((workdir / "resumed_checkpoints" / "global_step_4" / CURRICULUM_FILE).read_text())
    reference = json.loads((workdir / "checkpoints" / "global_step_4" / CURRICULUM_FILE).read_text())
    assert _without_counts(ours) == _without_counts(reference)
