"""The CPU run in the GPU run's shape, and dynamic sampling: two FSDP ranks (gloo), micro-batch 1,
dynamic batch size.

One 4-step ``main_ppo`` of ``karl_kvg_cpu`` with ``trainer.n_gpus_per_node=2`` and every karl feature
a recipe turns on at once: knowledge injection (``karl_kvg_inject``), dynamic sampling on success
with ``karl_kvg_dynamic``'s filter settings, and the prompt curriculum (``karl_kvg_curriculum``),
with a probe refresh before each epoch and checkpoints at steps 2 and 4; inputs are the dry run's.
Per-rank problems show here and not on one rank: a metric some ranks report and others do not (verl's
all-gather of metric lists), batches split over ranks at micro-batch 1, one rollout replica per rank.

Injection is on for level-5 prompts only, so that the other levels' groups can be constant and
dynamic sampling drops and refills them across the two ranks. tau is lowered to 0.05 so that the
tiny model's groups are of both kinds (it rarely reaches the paper's 0.65): most groups still fail
everywhere and are dropped. One prompt batch is in flight (the recipe has 2): with two, how many
batches a step generates before enough groups pass depends on timing, and a loaded machine spent
the filter's budget in every step (seen once in a full-suite run), leaving the "no constant group
trained" branch unchecked. About 2 minutes on 2 cores.
"""

import json
import re

import pytest

from karl_verl.dryrun.pipeline import DryRunOptions, compose_recipe, train, training_overrides
from karl_verl.integration.curriculum import CURRICULUM_FILE

pytestmark = pytest.mark.slow

STEPS = 4
LEVELS = range(1, 6)
PROMPTS_PER_STEP, N = 4, 4  # the dry run's batch and rollouts per prompt


def _recipe_filter_overrides() -> list[str]:
    filter_groups = compose_recipe("karl_kvg_dynamic", []).algorithm.filter_groups
    return [f"algorithm.filter_groups.{key}={filter_groups[key]}"
            for key in ("enable", "metric", "max_num_gen_batches", "max_inflight_gen_batches")]


@pytest.fixture(scope="module")
def two_ranks(dry_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ranks")
    paths = dry_run.paths
    references = dry_run.write_references(workdir / "references.jsonl")
    options = DryRunOptions(workdir=workdir, progress=False)
    overrides = [
        *training_overrides(options, paths, checkpoints=workdir / "checkpoints", hydra_dir=workdir / "hydra",
                            total_epochs=2),
        "trainer.n_gpus_per_node=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        # karl_kvg_inject
        "karl.inject.enable=true", f"karl.inject.responses_path={references}", "karl.inject.levels=[5]",
        "actor_rollout_ref.rollout.agent.default_agent_loop=karl_inject_agent",
        # karl_kvg_dynamic
        *_recipe_filter_overrides(), "algorithm.filter_groups.max_inflight_gen_batches=1",
        # karl_kvg_curriculum (verl's order: equal weights); it counts every rollout's outcome, dropped ones too
        "karl.curriculum.enable=true",
        "karl.reward.tau=0.05",
    ]
    assert "algorithm.filter_groups.metric=success" in overrides
    run = train(options, paths, "two_ranks", overrides, STEPS)
    assert run.ok, run.log_tail()
    return run, workdir


def test_two_ranks_train_every_step_with_every_feature(two_ranks):
    run, workdir = two_ranks
    assert [int(r["step"]) for r in run.steps] == list(range(1, STEPS + 1))
    assert (workdir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    log = run.log_path.read_text(errors="replace")
    assert set(re.findall(r"karl_transformers_rollout_(\d)", log)) == {"0", "1"}  # a rollout replica per rank
    injected = dropped = 0
    for record in run.steps:
        data = record["data"]
        assert data["karl/reward/errors"] == 0
        # The inject loss reports its metrics from both ranks' micro-batches (verl gathers them per rank).
        assert data.get("karl/inject/aligned_rollout_rows", 0) == data["karl/inject/rows"]
        if data["karl/inject/rows"]:
            assert 0 < data["actor/karl_offpolicy_ratio_mean"] < 1
        assert data["training/rollout_probs_diff_max"] < 0.2
        assert "karl/curriculum/reweights" in data
        injected += data["karl/inject/rows"]
        dropped += data["karl/filter/dropped_groups"]
    # Injection on level 5 only, so that groups of other levels can be constant and dropped: both
    # features acted (measured: 10 injected rows and 27 dropped groups over the 4 steps).
    assert injected > 0 and dropped > 0
    refreshed = [int(r["step"]) for r in run.steps if r["data"].get("karl/refresh/ok") == 1]
    assert refreshed == [1, 3]  # the probe at train begin and before epoch 2


def test_the_filter_drops_exactly_the_constant_groups_and_counts_them_per_level(two_ranks):
    run, workdir = two_ranks
    data = [record["data"] for record in run.steps]
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
        # Groups are trained at their levels, split over the ranks without padding rows.
        assert sum(step.get(f"karl/level_{k}/count", 0) for k in LEVELS) == PROMPTS_PER_STEP * N
    assert sum(step["karl/filter/refilled_prompts"] for step in data) > 0
    assert any(step["karl/filter/budget_exhausted"] == 0 for step in data), data
    # The outcomes of dropped groups were counted before the filter cleared them: the curriculum's
    # band-pass and the online estimate see every generated group, not only kept ones.
    state = json.loads((workdir / "checkpoints" / "global_step_2" / CURRICULUM_FILE).read_text())
    counted = sum(s + f for s, f in state["counts"]["counts"].values())
    assert counted == N * (2 * PROMPTS_PER_STEP + sum(step["karl/filter/dropped_groups"] for step in data[:2]))
