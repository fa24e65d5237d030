"""The CPU run in the GPU run's shape: two FSDP ranks (gloo), micro-batch 1 and dynamic batch size.

One 4-step ``main_ppo`` of ``karl_kvg_cpu`` with ``trainer.n_gpus_per_node=2`` and every karl feature
a recipe turns on at once: knowledge injection (``karl_kvg_inject``), dynamic sampling on success
(``karl_kvg_dynamic``) and the prompt curriculum (``karl_kvg_curriculum``), with a probe refresh
before each epoch and checkpoints at steps 2 and 4; inputs are the dry run's. Per-rank problems
show here and not on one rank: a metric some ranks report and others do not (verl's all-gather of
metric lists), batches split over ranks at micro-batch 1, one rollout replica per rank. Injection is on
for level-5 prompts only, so that the other levels' groups can be constant and dynamic sampling drops
and refills them across the two ranks. About 2 minutes on 2 cores.
"""

import re

import pytest

from karl_verl.dryrun.pipeline import DryRunOptions, train, training_overrides

pytestmark = pytest.mark.slow

STEPS = 4


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
        "algorithm.filter_groups.enable=true", "algorithm.filter_groups.metric=success",
        "algorithm.filter_groups.max_num_gen_batches=4", "algorithm.filter_groups.max_inflight_gen_batches=1",
        # karl_kvg_curriculum
        "karl.curriculum.enable=true",
        "karl.reward.tau=0.05",
    ]
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
        assert data["karl/filter/budget_exhausted"] == 0 and "karl/curriculum/reweights" in data
        injected += data["karl/inject/rows"]
        dropped += data["karl/filter/dropped_groups"]
    # Injection on level 5 only, so that groups of other levels can be constant and dropped: both
    # features acted (measured: 10 injected rows and 27 dropped groups over the 4 steps).
    assert injected > 0 and dropped > 0
    refreshed = [int(r["step"]) for r in run.steps if r["data"].get("karl/refresh/ok") == 1]
    assert refreshed == [1, 3]  # the probe at train begin and before epoch 2
