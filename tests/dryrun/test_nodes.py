"""The CPU run across two Ray nodes on one machine: ``trainer.nnodes=2``, a refresh, a checkpoint, a resume.

A Ray head and a second node are started with ``ray start`` (127.0.0.1, each 1 logical GPU, the CPU
layer's variables in their environment, a private temp folder so that no other ``ray.init`` on the
machine finds this cluster), and ``main_ppo`` joins them (``ray_kwargs.ray_init.address``): one FSDP
rank and one rollout replica per node, a reward worker on each node (``reward.num_workers=2``, which
verl places round-robin over nodes). The first run trains 2 epochs of 2 steps (probe at train begin,
refresh before epoch 2, checkpoints at steps 2 and 4); the second resumes from step 4 and trains
step 5. Placement is read from Ray's own actor table after each run. Both nodes are stopped at the
end. About 3 minutes on 2 cores.
"""


import pytest
from ray_nodes import TwoNodes

from karl_verl.dryrun.pipeline import DryRunOptions, train, training_overrides

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def two_node_runs(dry_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nodes")
    paths = dry_run.paths
    options = DryRunOptions(workdir=workdir, progress=False)
    cluster = TwoNodes()
    try:
        runs, placement = {}, {}
        for name, epochs, steps, expected in (("first", 2, None, 4), ("resumed", 3, 5, 1)):
            metrics = workdir / "metrics" / f"{name}.jsonl"
            overrides = [
                *training_overrides(options, paths, checkpoints=workdir / "checkpoints",
                                    hydra_dir=workdir / "hydra" / name, total_epochs=epochs, total_steps=steps),
                "trainer.nnodes=2", "trainer.n_gpus_per_node=1", "reward.num_workers=2",
                f"+ray_kwargs.ray_init.address={cluster.address}", "ray_kwargs.ray_init.num_cpus=null",
                "ray_kwargs.ray_init.num_gpus=null",
                # The trainer runs on either node: verl's file logger there gets its path from the job's env.
                f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={metrics}",
            ]
            runs[name] = train(options, paths, name, overrides, expected, env={"RAY_AUTH_MODE": "disabled"})
            assert runs[name].ok, runs[name].log_tail()
            placement[name] = cluster.actors()
        return runs, placement, workdir
    finally:
        cluster.stop()


def test_two_nodes_train_refresh_checkpoint_and_resume(two_node_runs):
    runs, _, workdir = two_node_runs
    assert [int(r["step"]) for r in runs["first"].steps] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in runs["resumed"].steps] == [5]
    assert (workdir / "checkpoints" / "global_step_4").is_dir()  # what the resume started from
    assert (workdir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    refreshed = [int(r["step"]) for r in runs["first"].steps if r["data"].get("karl/refresh/ok") == 1]
    assert refreshed == [1, 3]
    assert all(r["data"]["karl/reward/errors"] == 0 for run in runs.values() for r in run.steps)
    assert all(r["data"]["karl/level/reward_level_mismatch"] == 0 for run in runs.values() for r in run.steps)


def test_ranks_rollout_replicas_and_reward_workers_run_on_both_nodes(two_node_runs):
    _, placement, _ = two_node_runs
    for name, actors in placement.items():
        nodes = set().union(*actors.values())
        assert len(nodes) == 2, (name, dict(actors))
        assert len(actors["RewardLoopWorker"]) == 2, (name, dict(actors))
        assert len(actors["TransformersRolloutServer"]) == 2, (name, dict(actors))
        fsdp = [nodes_of for cls, nodes_of in actors.items() if cls.endswith("WorkerDict")]
        assert fsdp and len(set().union(*fsdp)) == 2, (name, dict(actors))
