"""Dynamic sampling on the real CPU path: verl's main_ppo with karl_kvg_dynamic's group filter.

One run of two steps from the dry run's inputs (data, warmed-up tiny model) with the filter settings
of the ``karl_kvg_dynamic`` recipe. tau is lowered to 0.05 so that the tiny model's groups are of
both kinds (it rarely reaches the paper's 0.65): most groups still fail everywhere and are dropped.
"""

import json

import pytest

from karl_verl.dryrun.pipeline import DryRunOptions, compose_recipe, train, training_overrides
from karl_verl.integration.curriculum import CURRICULUM_FILE

pytestmark = pytest.mark.slow

LEVELS = range(1, 6)


def _recipe_filter_overrides() -> list[str]:
    filter_groups = compose_recipe("karl_kvg_dynamic", []).algorithm.filter_groups
    return [f"algorithm.filter_groups.{key}={filter_groups[key]}"
            for key in ("enable", "metric", "max_num_gen_batches", "max_inflight_gen_batches")]


def test_the_filter_drops_exactly_the_constant_groups_and_counts_them_per_level(dry_run, tmp_path):
    options = DryRunOptions(workdir=tmp_path, progress=False)
    paths = dry_run.paths
    overrides = training_overrides(options, paths, checkpoints=tmp_path / "checkpoints", hydra_dir=tmp_path / "hydra",
                                   total_epochs=1, total_steps=2)
    # The curriculum (verl's order: equal weights) counts every rollout's outcome, dropped ones included.
    # One prompt batch in flight (the recipe has 2): with two, how many batches a step generates before
    # enough groups pass depends on timing, and a loaded machine spent the budget in both steps (seen
    # once in a full-suite run), leaving the "no constant group trained" branch below unchecked.
    overrides += ["trainer.save_freq=2", "karl.reward.tau=0.05", "karl.curriculum.enable=true",
                  *_recipe_filter_overrides(), "algorithm.filter_groups.max_inflight_gen_batches=1"]
    assert "algorithm.filter_groups.metric=success" in overrides
    run = train(options, paths, "dynamic", overrides, 2)
    assert run.ok, run.log_tail()
    data = [record["data"] for record in run.steps]
    assert len(data) == 2
    for step in data:
        dropped = step["karl/filter/dropped_groups"]
        # Our count is verl's own eviction count, and every dropped group had one shared success value.
        assert dropped == step.get("training/filter_groups/evicted_samples", 0.0)
        assert dropped == sum(step[f"karl/filter/level_{k}/dropped_groups"] for k in LEVELS)
        assert dropped == sum(step[f"karl/filter/level_{k}/dropped_all_success"]
                              + step[f"karl/filter/level_{k}/dropped_all_failure"] for k in LEVELS)
        assert step["karl/filter/refilled_prompts"] == sum(step[f"karl/filter/level_{k}/refilled_prompts"]
                                                           for k in LEVELS)
        if step["karl/filter/budget_exhausted"] == 0:
            # No constant group reached training: the filter dropped every one of them.
            assert step["karl/filter/trained_constant_groups"] == 0
        # Groups are trained at their levels: 4 prompts x n=4 rollouts.
        assert sum(step.get(f"karl/level_{k}/count", 0) for k in LEVELS) == 16
    assert sum(step["karl/filter/dropped_groups"] for step in data) > 0
    assert sum(step["karl/filter/refilled_prompts"] for step in data) > 0
    assert any(step["karl/filter/budget_exhausted"] == 0 for step in data), data
    # The outcomes of dropped groups were counted before the filter cleared them (n=4 rollouts a group):
    # the curriculum's band-pass and the online estimate see every generated group, not only kept ones.
    state = json.loads((tmp_path / "checkpoints" / "global_step_2" / CURRICULUM_FILE).read_text())
    counted = sum(s + f for s, f in state["counts"]["counts"].values())
    assert counted == 4 * (2 * 4 + sum(step["karl/filter/dropped_groups"] for step in data))
