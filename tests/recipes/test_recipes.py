"""Hydra recipes: after a non-editable install, ``+recipe=NAME`` composes from any folder.

The package is installed (``pip install --no-deps --target``) into a temporary folder, exactly as
a wheel would lay it out, and ``python -m verl.trainer.main_ppo +recipe=NAME --cfg job`` runs
from an empty working directory against it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["karl_kvg", "karl_kvg_cpu", "karl_kvg_grpo", "karl_kvg_no_pos", "karl_kvg_no_neg", "karl_kvg_v1", "karl_kvg_v2"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, text=True, timeout=600, cwd=build,
    )
    return target


def main_ppo(installed, workdir, *args, timeout=300):
    environment = {**os.environ, "PYTHONPATH": str(installed), "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", *args], cwd=workdir, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def compose(installed, workdir, recipe, *overrides):
    result = main_ppo(installed, workdir, f"+recipe={recipe}", *overrides, "--cfg", "job")
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def composed(installed, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("anywhere")
    return {recipe: compose(installed, workdir, recipe) for recipe in RECIPES}


def test_recipe_files_are_installed(installed):
    shipped = sorted(p.stem for p in (installed / "karl_verl" / "recipes" / "recipe").glob("*.yaml"))
    assert shipped == sorted(RECIPES)
    assert (installed / "hydra_plugins" / "karl_verl_recipes" / "__init__.py").is_file()


def test_karl_kvg_is_the_paper_run(composed):
    cfg = composed["karl_kvg"]
    actor = cfg["actor_rollout_ref"]["actor"]
    rollout = cfg["actor_rollout_ref"]["rollout"]
    assert cfg["algorithm"]["adv_estimator"] == "karl_grpo"
    assert cfg["reward"]["reward_manager"]["name"] == "karl"
    assert cfg["trainer"]["v1"]["trainer_mode"] == "karl"
    assert rollout["n"] == 4 and rollout["name"] == "vllm" and rollout["gpu_memory_utilization"] == 0.55
    assert actor["optim"]["lr"] == 5e-7 and actor["optim"]["betas"] == [0.9, 0.999]
    assert cfg["data"]["train_batch_size"] == 8
    assert actor["ppo_mini_batch_size"] == 4 and actor["ppo_micro_batch_size_per_gpu"] == 2
    assert actor["use_kl_loss"] is True and actor["kl_loss_coef"] == 0.02 and actor["kl_loss_type"] == "low_var_kl"
    assert actor["entropy_coeff"] == 0 and cfg["algorithm"]["use_kl_in_reward"] is False
    assert cfg["data"]["max_response_length"] == 1500 and cfg["data"]["max_prompt_length"] == 4800
    assert cfg["trainer"]["total_epochs"] == 2
    assert actor["strategy"] == "fsdp" and actor["fsdp_config"]["optimizer_offload"] is True
    assert cfg["actor_rollout_ref"]["model"]["enable_gradient_checkpointing"] is True
    assert cfg["data"]["image_key"] == "images"
    assert cfg["karl"]["reward"]["preset"] == "karl"


@pytest.mark.parametrize(("recipe", "preset"), [("karl_kvg_no_pos", "no_pos"), ("karl_kvg_no_neg", "no_neg"),
                                                ("karl_kvg_v1", "v1"), ("karl_kvg_v2", "v2")])
def test_ablations_change_only_the_preset(composed, recipe, preset):
    cfg = composed[recipe]
    assert cfg["karl"]["reward"]["preset"] == preset
    assert cfg["trainer"]["experiment_name"] == recipe
    base = dict(composed["karl_kvg"])
    for key in ("karl", "trainer"):
        base.pop(key), cfg.pop(key)
    assert cfg == base


def test_vanilla_grpo(composed):
    cfg = composed["karl_kvg_grpo"]
    assert cfg["algorithm"]["adv_estimator"] == "grpo"
    assert cfg["karl"]["reward"]["preset"] == "uniform"
    assert cfg["trainer"]["v1"]["trainer_mode"] == "sync"


def test_paths_are_overridable(installed, tmp_path):
    cfg = compose(installed, tmp_path, "karl_kvg", "data.train_files=/d/train.parquet",
                  "actor_rollout_ref.model.path=/m/qwen", "trainer.default_local_dir=/ckpt")
    assert cfg["data"]["train_files"] == "/d/train.parquet"
    assert cfg["actor_rollout_ref"]["model"]["path"] == "/m/qwen"
    assert cfg["trainer"]["default_local_dir"] == "/ckpt"


def test_unset_required_keys_stop_the_run_at_once(installed, tmp_path):
    result = main_ppo(installed, tmp_path, "+recipe=karl_kvg", "data.train_files=/d/train.parquet", timeout=120)
    assert result.returncode != 0
    message = result.stderr
    assert "data.val_files" in message and "actor_rollout_ref.model.path" in message
    assert "trainer.default_local_dir" in message and "data.train_files=..." not in message
    assert "Started a local Ray instance" not in result.stdout + result.stderr


def test_karl_trainer_without_table_or_probe_set_stops_before_ray(installed, tmp_path):
    """All path keys set, but the karl trainer has no way to get a first mastery table."""
    result = main_ppo(installed, tmp_path, "+recipe=karl_kvg", "data.train_files=/d/train.parquet",
                      "data.val_files=/d/val.parquet", "actor_rollout_ref.model.path=/m/qwen",
                      "trainer.default_local_dir=/ckpt", timeout=120)
    assert result.returncode != 0
    assert "karl.mastery.table_path" in result.stderr and "karl.mastery.probe_data" in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
