"""Hydra recipes: after a non-editable install, ``+recipe=NAME`` composes from any folder.

The package is installed (``pip install --no-deps --target``) into a temporary folder, exactly as
a wheel would lay it out, and ``python -m verl.trainer.main_ppo +recipe=NAME --cfg job`` runs
from an empty working directory against it.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["karl_kvg", "karl_kvg_grpo", "karl_kvg_no_pos", "karl_kvg_no_neg", "karl_kvg_v1", "karl_kvg_v2"]
#: Recipes of verl's SFT trainer (stage 1).
SFT_RECIPES = ["karl_cot_sft"]
#: The CPU variants (tested with the dry run, tests/dryrun).
CPU_RECIPES = ["karl_kvg_cpu", "karl_cot_sft_cpu", "karl_kvg_cpu_vllm"]
#: karl-verl's additions beyond the paper, each karl_kvg plus one feature.
EXTENSION_RECIPES = ["karl_kvg_dynamic", "karl_kvg_inject", "karl_kvg_curriculum", "karl_kvg_ivgr"]


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


def main_ppo(installed, workdir, *args, timeout=300, entry="verl.trainer.main_ppo"):
    environment = {**os.environ, "PYTHONPATH": str(installed), "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", entry, *args], cwd=workdir, env=environment,
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
    assert shipped == sorted(RECIPES + SFT_RECIPES + CPU_RECIPES + EXTENSION_RECIPES)
    assert (installed / "hydra_plugins" / "karl_verl_recipes" / "__init__.py").is_file()


def _without(config: dict, dotted: str) -> dict:
    out = {**config}
    head, _, rest = dotted.partition(".")
    out[head] = _without(out[head], rest) if rest else None
    return out


def test_karl_kvg_dynamic_is_karl_kvg_with_the_success_filter(installed, composed, tmp_path):
    cfg = compose(installed, tmp_path, "karl_kvg_dynamic")
    filter_groups = cfg["algorithm"]["filter_groups"]
    assert filter_groups["enable"] is True and filter_groups["metric"] == "success"
    assert filter_groups["max_num_gen_batches"] > 1
    # Everything else is the paper's run.
    assert _without(cfg, "algorithm.filter_groups") == _without(composed["karl_kvg"], "algorithm.filter_groups")


def test_the_cpu_recipe_runs_the_gpu_recipes_fsdp_strategy(installed, composed, tmp_path):
    cpu = compose(installed, tmp_path, "karl_kvg_cpu")
    for role in ("actor", "ref"):
        gpu_strategy = composed["karl_kvg"]["actor_rollout_ref"][role]["strategy"]
        assert cpu["actor_rollout_ref"][role]["strategy"] == gpu_strategy == "fsdp2"


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
    # Without chunked prefill a whole sequence must fit a batch: verl 0.9.1's vLLM server dies at start
    # when max_model_len (by default the model's 262144 positions) exceeds max_num_batched_tokens.
    assert rollout["enable_chunked_prefill"] is False
    assert 4800 + 1500 <= rollout["max_model_len"] <= rollout["max_num_batched_tokens"]
    assert cfg["trainer"]["total_epochs"] == 2
    # FSDP2 (verl's recommendation), the strategy the CPU recipe runs too.
    assert actor["strategy"] == "fsdp2" and cfg["actor_rollout_ref"]["ref"]["strategy"] == "fsdp2"
    assert actor["fsdp_config"]["optimizer_offload"] is True
    assert cfg["actor_rollout_ref"]["model"]["enable_gradient_checkpointing"] is True
    assert cfg["data"]["image_key"] == "images"
    assert cfg["karl"]["reward"]["preset"] == "karl"


@pytest.mark.parametrize(("recipe", "preset"), [("karl_kvg_no_pos", "no_pos"), ("karl_kvg_no_neg", "no_neg"),
                                                ("karl_kvg_v1", "v1"), ("karl_kvg_v2", "v2")])
def test_ablations_change_only_the_preset(composed, recipe, preset):
    cfg = dict(composed[recipe])
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


def test_inject_turns_on_injection_and_its_agent_loop_only(installed, composed, tmp_path):
    from karl_verl.config import hydra_default_nodes

    cfg = compose(installed, tmp_path, "karl_kvg_inject")
    assert cfg["karl"]["inject"] == dict(hydra_default_nodes()["karl/inject/default"], enable=True)
    assert composed["karl_kvg"]["karl"]["inject"]["enable"] is False
    assert cfg["actor_rollout_ref"]["rollout"]["agent"]["default_agent_loop"] == "karl_inject_agent"
    assert cfg["trainer"]["experiment_name"] == "karl_kvg_inject"
    # Deep copies: the module's composed configs are shared with the other tests.
    base, ours = copy.deepcopy(composed["karl_kvg"]), copy.deepcopy(cfg)
    for config in (base, ours):
        config["karl"] = {k: v for k, v in config["karl"].items() if k != "inject"}
        config["trainer"] = {k: v for k, v in config["trainer"].items() if k != "experiment_name"}
        config["actor_rollout_ref"]["rollout"]["agent"].pop("default_agent_loop")
    assert ours == base


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


#: The released stage-2 run (KARL fork, examples/grpo_trainer/run_qwen3_vl-8b-FSDP-kvg-knowledge.sh),
#: every override whose key verl 0.9.1 has with the same meaning. Left out, each on purpose: the
#: paths and names; algorithm.adv_estimator=grpo and custom_reward_function (karl_grpo with its
#: default all-ones weights and the karl reward manager are the same computation); save_freq=514 (ours
#: 50, with the mastery state in each checkpoint); engine_kwargs.vllm.disable_mm_preprocessor_cache
#: (vLLM's later mm_processor_cache_gb=0, asserted below); use_remove_padding=True, which karl.runtime.attention=auto
#: resolves to where flash-attn imports (test_karl_kvg_resolves_its_attention_by_whether_flash_attn_imports).
RELEASED_STAGE2 = {
    "data.train_batch_size": 8,
    "data.max_prompt_length": 4800,
    "data.max_response_length": 1500,
    "data.filter_overlong_prompts": False,
    "data.filter_overlong_prompts_workers": 8,
    "data.truncation": "error",
    "actor_rollout_ref.actor.optim.lr": 5e-7,
    "actor_rollout_ref.model.use_fused_kernels": True,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 4,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 2,
    "actor_rollout_ref.actor.use_kl_loss": True,
    "actor_rollout_ref.actor.kl_loss_coef": 0.02,
    "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
    "actor_rollout_ref.actor.entropy_coeff": 0,
    "actor_rollout_ref.model.enable_gradient_checkpointing": True,
    "actor_rollout_ref.actor.fsdp_config.param_offload": False,
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": True,
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": 2,
    "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
    "actor_rollout_ref.rollout.name": "vllm",
    "actor_rollout_ref.rollout.gpu_memory_utilization": 0.55,
    "actor_rollout_ref.rollout.enable_chunked_prefill": False,
    "actor_rollout_ref.rollout.enforce_eager": False,
    "actor_rollout_ref.rollout.free_cache_engine": True,
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": 2,
    "actor_rollout_ref.rollout.n": 4,
    "actor_rollout_ref.ref.fsdp_config.param_offload": True,
    "algorithm.use_kl_in_reward": False,
    "trainer.critic_warmup": 0,
    "trainer.logger": ["console", "wandb"],
    "trainer.n_gpus_per_node": 8,
    "trainer.nnodes": 1,
    "trainer.total_epochs": 2,
}


def test_karl_kvg_matches_the_released_stage2_run_key_for_key(installed, tmp_path):
    cfg = compose(installed, tmp_path, "karl_kvg", "--resolve")
    differing = {}
    for key, released in RELEASED_STAGE2.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node != released:
            differing[key] = (released, node)
    assert differing == {}
    assert cfg["actor_rollout_ref"]["rollout"]["engine_kwargs"]["vllm"]["mm_processor_cache_gb"] == 0
    # The actor follows the model's switch (an interpolation, seen resolved).
    assert cfg["actor_rollout_ref"]["actor"]["use_fused_kernels"] is True


def test_cfg_job_shows_every_karl_value(composed):
    """Real defaults, not nulls: tau, the scale tables and the probe settings as the dataclasses have them."""
    from karl_verl.config import AdvantageConfig, MasteryConfig, RewardConfig, hydra_default_nodes

    cfg = composed["karl_kvg"]
    assert cfg["karl"]["reward"] == hydra_default_nodes()["karl/reward/karl"]
    assert cfg["karl"]["reward"]["tau"] == 0.65 and cfg["karl"]["reward"]["pos_scale"] == [0.65, 0.85, 1.0, 1.2, 1.4]
    assert cfg["karl"]["mastery"] == hydra_default_nodes()["karl/mastery/default"]
    assert cfg["karl"]["mastery"]["probe_images_per_entity"] == MasteryConfig().probe_images_per_entity
    assert cfg["algorithm"]["karl"]["alpha_plus"] == list(AdvantageConfig().alpha_plus)
    assert RewardConfig.from_mapping(cfg["karl"]["reward"]) == RewardConfig()
    for recipe, preset in (("karl_kvg_v1", "v1"), ("karl_kvg_grpo", "uniform")):
        assert composed[recipe]["karl"]["reward"] == hydra_default_nodes()[f"karl/reward/{preset}"]


def test_a_preset_is_chosen_on_the_command_line_as_a_group(installed, tmp_path):
    cfg = compose(installed, tmp_path, "karl_kvg", "karl/reward=no_neg", "karl.reward.tau=0.5")
    assert cfg["karl"]["reward"]["preset"] == "no_neg" and cfg["karl"]["reward"]["neg_scale"] == [0.0] * 5
    assert cfg["karl"]["reward"]["tau"] == 0.5


def test_hydra_output_goes_under_the_checkpoint_folder(installed, tmp_path):
    result = main_ppo(installed, tmp_path, "+recipe=karl_kvg", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-3000:]
    hydra = yaml.safe_load(result.stdout)["hydra"]
    assert hydra["run"]["dir"].startswith("${trainer.default_local_dir}/")
    assert hydra["sweep"]["dir"].startswith("${trainer.default_local_dir}/")


@pytest.mark.parametrize(("recipe", "overrides"), [
    ("karl_kvg_grpo", ["karl/reward=uniform", "algorithm.adv_estimator=grpo", "trainer.v1.trainer_mode=sync",
                       "karl.mastery.refresh_every_epochs=0"]),
    ("karl_kvg_v1", ["karl/reward=v1"]),
])
def test_an_ablation_is_the_command_line_the_readme_gives(composed, installed, tmp_path, recipe, overrides):
    by_hand = compose(installed, tmp_path, "karl_kvg", *overrides, f"trainer.experiment_name={recipe}")
    assert by_hand == composed[recipe]


def sft_trainer(installed, workdir, *args, timeout=300):
    return main_ppo(installed, workdir, *args, timeout=timeout, entry="verl.trainer.sft_trainer")


def test_karl_cot_sft_is_the_released_stage_1_run(installed, tmp_path):
    result = sft_trainer(installed, tmp_path, "+recipe=karl_cot_sft", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    data, optim, engine, trainer = cfg["data"], cfg["optim"], cfg["engine"], cfg["trainer"]
    assert optim["lr"] == 2e-6 and optim["lr_scheduler_type"] == "cosine" and optim["lr_warmup_steps_ratio"] == 0.1
    assert optim["min_lr_ratio"] == 0.0 and optim["weight_decay"] == 0.0 and optim["betas"] == [0.9, 0.999]
    assert optim["clip_grad"] == 1.0 and optim["optimizer"] == "AdamW"
    assert trainer["total_epochs"] == 1 and trainer["n_gpus_per_node"] == 8 and trainer["nnodes"] == 1
    assert data["train_batch_size"] == 16 and data["micro_batch_size_per_gpu"] == 2
    assert data["train_batch_size"] // (trainer["n_gpus_per_node"] * data["micro_batch_size_per_gpu"]) == 1
    assert data["use_dynamic_bsz"] is False and data["max_length"] == 4096
    assert data["messages_key"] == "messages" and data["image_key"] == "images"
    assert data["enable_thinking_default"] is None
    assert engine["strategy"] == "fsdp2" and engine["mixed_precision"]["param_dtype"] == "bf16"
    assert engine["model_dtype"] == "fp32"
    assert cfg["model"]["enable_gradient_checkpointing"] is True
    assert "hf_model" in cfg["checkpoint"]["save_contents"]
    assert cfg["karl"]["sft"] == {"freeze_vision_tower": None, "freeze_multi_modal_projector": None}


def test_karl_cot_sft_unset_paths_stop_at_once(installed, tmp_path):
    result = sft_trainer(installed, tmp_path, "+recipe=karl_cot_sft", "model.path=/m/qwen", timeout=120)
    assert result.returncode != 0
    assert "data.train_files=..." in result.stderr and "trainer.default_local_dir=..." in result.stderr
    assert "model.path=..." not in result.stderr and "verl.trainer.sft_trainer +recipe=karl_cot_sft" in result.stderr


def test_karl_cot_sft_runs_the_freeze_callback(installed, tmp_path):
    """The freeze callback runs in the trainer's own process and refuses a bad karl.sft value loudly."""
    data = tmp_path / "sft.parquet"
    data.write_bytes(b"")  # exists: the pre-flight's path check passes and the freeze callback is reached
    result = sft_trainer(installed, tmp_path, "+recipe=karl_cot_sft", f"data.train_files={data}",
                         "model.path=/m/qwen", "trainer.default_local_dir=/ckpt", "karl.sft.freeze_vision_tower=maybe",
                         timeout=120)
    assert result.returncode != 0
    assert "karl.sft.freeze_vision_tower: expected true or false, got 'maybe'" in result.stderr


def test_curriculum_is_off_by_default_and_on_in_its_recipe(installed, composed, tmp_path):
    """karl.curriculum shows every key in the composed config; karl_kvg_curriculum turns the sampler on
    and changes nothing else."""
    from karl_verl.config import CurriculumConfig, hydra_default_nodes

    assert composed["karl_kvg"]["karl"]["curriculum"] == hydra_default_nodes()["karl/curriculum/default"]
    assert CurriculumConfig.from_mapping(composed["karl_kvg"]["karl"]["curriculum"]) == CurriculumConfig()
    on = compose(installed, tmp_path, "karl_kvg_curriculum")
    assert on["karl"]["curriculum"] == hydra_default_nodes()["karl/curriculum/focus"]
    curriculum = CurriculumConfig.from_mapping(on["karl"]["curriculum"])
    assert curriculum.enable and not curriculum.is_uniform and curriculum.band_pass
    plain = composed["karl_kvg"]
    assert {k: v for k, v in on.items() if k not in ("karl", "trainer")} == {
        k: v for k, v in plain.items() if k not in ("karl", "trainer")}
    assert {k: v for k, v in on["karl"].items() if k != "curriculum"} == {
        k: v for k, v in plain["karl"].items() if k != "curriculum"}


def test_ivgr_is_off_by_default_and_on_in_its_recipe(installed, composed, tmp_path):
    """karl.ivgr shows every key in the composed config; karl_kvg_ivgr turns it on and changes nothing else
    (the judge URL is the user's to give)."""
    from karl_verl.config import IvgrConfig, hydra_default_nodes

    assert composed["karl_kvg"]["karl"]["ivgr"] == hydra_default_nodes()["karl/ivgr/default"]
    assert IvgrConfig.from_mapping(composed["karl_kvg"]["karl"]["ivgr"]) == IvgrConfig()
    on = compose(installed, tmp_path, "karl_kvg_ivgr", "karl.ivgr.judge_url=http://judge:8000/v1")
    ivgr = IvgrConfig.from_mapping(on["karl"]["ivgr"])
    assert ivgr.enable and ivgr.judge_url == "http://judge:8000/v1"
    assert {k: v for k, v in on["karl"]["ivgr"].items() if k not in ("enable", "judge_url")} == {
        k: v for k, v in composed["karl_kvg"]["karl"]["ivgr"].items() if k not in ("enable", "judge_url")}
    plain = composed["karl_kvg"]
    assert {k: v for k, v in on.items() if k not in ("karl", "trainer")} == {
        k: v for k, v in plain.items() if k not in ("karl", "trainer")}
    assert {k: v for k, v in on["karl"].items() if k != "ivgr"} == {
        k: v for k, v in plain["karl"].items() if k != "ivgr"}


@pytest.mark.parametrize("mode", ["colocate_async", "separate_async", "sync"])
def test_another_trainer_mode_under_a_karl_recipe_is_refused_before_ray(composed, mode):
    """verl would run its own trainer: no levels for karl_grpo, no refresh, curriculum or injection."""
    from omegaconf import OmegaConf

    from karl_verl.integration.preflight import run_problems, trainer_mode_problem

    assert trainer_mode_problem(OmegaConf.create(composed["karl_kvg"])) is None
    config = OmegaConf.create(composed["karl_kvg"])
    config.trainer.v1.trainer_mode = mode
    problem = trainer_mode_problem(config)
    assert problem.startswith(f"trainer.v1.trainer_mode={mode}:")
    assert "karl_grpo" in problem and "mastery refresh" in problem and "trainer_mode=karl" in problem
    assert problem in run_problems(config, [], count_gpus=lambda: 8)[1]
    config.karl.curriculum.enable = True
    assert "karl.curriculum.enable=true" in trainer_mode_problem(config)
    # Plain GRPO with the karl reward on verl's trainer (karl_kvg_grpo) is a valid run.
    grpo = OmegaConf.create(composed["karl_kvg_grpo"])
    assert trainer_mode_problem(grpo) is None
    grpo.trainer.v1.trainer_mode = mode
    assert trainer_mode_problem(grpo) is None


def _resolved_attention(installed, workdir, recipe, *extra_paths):
    environment_paths = os.pathsep.join([*map(str, extra_paths), str(installed)])
    environment = {**os.environ, "PYTHONPATH": environment_paths, "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", f"+recipe={recipe}", "--cfg", "job",
                             "--resolve"], cwd=workdir, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = yaml.safe_load(result.stdout)["actor_rollout_ref"]["model"]
    return (model["override_config"]["attn_implementation"], model["use_remove_padding"]), result.stderr


def test_karl_kvg_resolves_its_attention_by_whether_flash_attn_imports(installed, tmp_path):
    """verl's own config composition, resolved as its TaskRunner resolves it, on this machine (no flash-attn)
    and with a flash-attn that imports (one that is installed but fails to import: tests/test_gpu_stack.py)."""
    assert _resolved_attention(installed, tmp_path, "karl_kvg")[0] == ("sdpa", False)
    working = tmp_path / "working"
    (working / "flash_attn").mkdir(parents=True)
    (working / "flash_attn" / "__init__.py").write_text('__version__ = "2.8.3"\n')
    # Installed as pip installs it: transformers reads the version from the metadata, never importing it.
    (working / "flash_attn-2.8.3.dist-info").mkdir()
    (working / "flash_attn-2.8.3.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.8.3\n")
    (working / "flash_attn-2.8.3.dist-info" / "top_level.txt").write_text("flash_attn\n")
    choice, log = _resolved_attention(installed, tmp_path, "karl_kvg", working)
    assert choice == ("flash_attention_2", True)
    assert "[karl-verl] actor attention: attn_implementation=flash_attention_2, use_remove_padding=true" in log
