"""Configuration dataclasses (karl_verl/config.py) and the Hydra nodes the recipes take from them."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from karl_verl.config import (
    REWARD_PRESETS,
    AdvantageConfig,
    ConfigError,
    InjectConfig,
    KarlConfig,
    MasteryConfig,
    RewardConfig,
    hydra_default_nodes,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "recipe" / "karl_kvg.yaml"


class TestRewardConfig:
    def test_defaults_are_the_paper_final_scales(self):
        config = RewardConfig()
        assert config.pos_scale == (0.65, 0.85, 1.0, 1.2, 1.4)
        assert config.neg_scale == (-0.6, -0.5, -0.4, -0.2, 0.0)
        assert (config.tau, config.inclusive_threshold, config.cap) == (0.65, False, 1.0)

    def test_presets(self):
        assert RewardConfig(preset="uniform").pos_scale == (1.0,) * 5
        assert RewardConfig(preset="uniform").neg_scale == (0.0,) * 5
        assert RewardConfig(preset="no_neg").neg_scale == (0.0,) * 5
        assert RewardConfig(preset="no_pos").neg_scale == RewardConfig().neg_scale
        assert RewardConfig(preset="v1").neg_scale == (-0.8, -0.6, -0.4, -0.2, 0.0)
        assert RewardConfig(preset="v2").pos_scale == (0.65, 0.85, 1.0, 1.15, 1.25)
        assert set(REWARD_PRESETS) == {"karl", "v1", "v2", "no_pos", "no_neg", "uniform"}

    def test_explicit_table_overrides_preset(self):
        assert RewardConfig(preset="v1", pos_scale=[1, 1, 1, 1, 2]).pos_scale == (1.0, 1.0, 1.0, 1.0, 2.0)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [({"preset": "best"}, "karl.reward.preset"), ({"pos_scale": (1, 2)}, "karl.reward.pos_scale"),
         ({"box_format": "yolo"}, "karl.reward.box_format"), ({"default_level": "novice"}, "default_level")],
    )
    def test_errors_name_the_key(self, kwargs, message):
        with pytest.raises(ConfigError, match=message):
            RewardConfig(**kwargs)

    def test_from_mapping_rejects_unknown_keys_and_skips_nulls(self):
        assert RewardConfig.from_mapping({"tau": None, "preset": "v2"}) == RewardConfig(preset="v2")
        with pytest.raises(ConfigError, match=r"karl.reward.tua: unknown key; did you mean karl.reward.tau\?"):
            RewardConfig.from_mapping({"tua": 0.5})


class TestOtherConfigs:
    def test_advantage_identity(self):
        assert AdvantageConfig().is_identity
        assert not AdvantageConfig(alpha_plus=(1, 1, 1, 1, 2)).is_identity

    def test_mastery_validation(self):
        with pytest.raises(ConfigError, match="probe_mode"):
            MasteryConfig(probe_mode="guess")
        with pytest.raises(ConfigError, match="thresholds"):
            MasteryConfig(thresholds=(0.1, 0.2, 0.3, 0.4))

    def test_karl_config_from_omegaconf(self):
        from omegaconf import OmegaConf

        cfg = OmegaConf.create({"reward": {"preset": "no_pos"}, "mastery": {"probe_mode": "generate"}})
        karl = KarlConfig.from_mapping(cfg)
        assert karl.reward.preset == "no_pos" and karl.mastery.probe_mode == "generate"


class TestHydraDefaultNodes:
    """The recipes' karl.* values come from these nodes, built from the dataclasses (no YAML copy)."""

    def test_one_reward_node_per_preset_with_its_tables(self):
        nodes = hydra_default_nodes()
        for preset, (pos, neg) in REWARD_PRESETS.items():
            node = nodes[f"karl/reward/{preset}"]
            assert node["preset"] == preset and node["pos_scale"] == list(pos) and node["neg_scale"] == list(neg)
            assert RewardConfig.from_mapping(node) == RewardConfig(preset=preset)

    @pytest.mark.parametrize(("name", "cls"), [("karl/reward/karl", RewardConfig),
                                               ("karl/mastery/default", MasteryConfig),
                                               ("karl/inject/default", InjectConfig),
                                               ("karl/advantage/default", AdvantageConfig)])
    def test_every_field_with_its_default(self, name, cls):
        node = hydra_default_nodes()[name]
        assert list(node) == [f.name for f in dataclasses.fields(cls)]
        assert cls.from_mapping(node) == cls()
        assert yaml.safe_load(yaml.safe_dump(node)) == node  # plain YAML types: lists, not tuples

    def test_recipe_writes_no_karl_number(self):
        recipe = yaml.safe_load(RECIPE.read_text())
        assert "karl" not in recipe
        assert recipe["algorithm"]["karl"] == {"default_level": "${karl.reward.default_level}"}


class TestEveryProblemAtOnce:
    def test_all_bad_fields_of_a_section(self):
        with pytest.raises(ConfigError) as raised:
            MasteryConfig(probe_mode="guess", seed=-1, online_decay=0, refresh_every_epochs=1.5)
        keys = [problem.split(":")[0] for problem in raised.value.problems]
        assert keys == ["karl.mastery.refresh_every_epochs", "karl.mastery.probe_mode",
                        "karl.mastery.online_decay", "karl.mastery.seed"]

    @pytest.mark.parametrize("tau", [1.5, 0, -0.1, float("nan"), "abc", True])
    def test_tau_in_zero_one(self, tau):
        with pytest.raises(ConfigError, match="karl.reward.tau"):
            RewardConfig(tau=tau)

    def test_tau_of_one_is_allowed(self):
        assert RewardConfig(tau=1).tau == 1.0

    @pytest.mark.parametrize("table", [[1, 2, 3, 4], [1, 2, 3, 4, float("inf")], [1, 2, 3, 4, "x"], "12345", 5])
    def test_five_finite_scales(self, table):
        with pytest.raises(ConfigError, match="karl.reward.pos_scale"):
            RewardConfig(pos_scale=table)

    @pytest.mark.parametrize(("key", "value"), [("probe_images_per_entity", 0), ("probe_max_concurrency", -1),
                                                ("probe_images_per_entity", "ten"), ("refresh_every_steps", -1),
                                                ("probe_timeout_s", 0), ("thresholds", [0.7, 0.45, 0.3, 1.5]),
                                                ("min_answered_share", 0), ("min_answered_share", 1.01),
                                                ("probe_max_pixels", 0), ("probe_max_pixels", "1M")])
    def test_positive_counts_and_ranges(self, key, value):
        with pytest.raises(ConfigError, match=f"karl.mastery.{key}"):
            MasteryConfig(**{key: value})

    def test_level_names(self):
        with pytest.raises(ConfigError, match="algorithm.karl.default_level"):
            AdvantageConfig(default_level="novice")

    def test_unknown_key_gets_the_closest_known_one_beside_the_bad_values(self):
        with pytest.raises(ConfigError) as raised:
            RewardConfig.from_mapping({"tua": 0.5, "cap": -1})
        assert raised.value.problems == ["karl.reward.tua: unknown key; did you mean karl.reward.tau?",
                                         "karl.reward.cap: expected a number in (0.0, inf], got -1"]

    def test_unknown_key_far_from_any_lists_the_known_ones(self):
        with pytest.raises(ConfigError, match="known keys: .*probe_data"):
            MasteryConfig.from_mapping({"zzzzzz": 1})


class TestCheckSections:
    def test_valid_sections_build(self):
        reward, mastery, problems = KarlConfig.check_sections({"reward": {"preset": "v1"}}, {"alpha_plus": [1] * 5})
        assert reward == RewardConfig(preset="v1") and mastery == MasteryConfig() and problems == []

    def test_every_error_of_every_section(self):
        reward, mastery, problems = KarlConfig.check_sections(
            {"reward": {"tau": "abc", "cap": 0}, "mastery": {"probe_mode": "guess", "seed": -2}, "mastry": 1},
            {"alpha_minus": [1, 2], "default_level": 9})
        assert reward is None and mastery is None
        assert [p.split(":")[0] for p in problems] == [
            "karl.mastry", "karl.reward.tau", "karl.reward.cap", "karl.mastery.probe_mode", "karl.mastery.seed",
            "algorithm.karl.alpha_minus", "algorithm.karl.default_level"]
        assert "did you mean karl.mastery?" in problems[0]

    def test_a_preset_renamed_alone_is_reported(self):
        """karl.reward.preset=v1 on the command line keeps the karl node's written-out tables."""
        node = dict(hydra_default_nodes()["karl/reward/karl"], preset="v1")
        _, _, problems = KarlConfig.check_sections({"reward": node}, None)
        assert len(problems) == 1 and "karl/reward=v1" in problems[0]
        assert KarlConfig.check_sections({"reward": hydra_default_nodes()["karl/reward/v1"]}, None)[2] == []
        own_tables = dict(node, pos_scale=[1, 1, 1, 1, 2])
        assert KarlConfig.check_sections({"reward": own_tables}, None)[2] == []


class TestInjectConfig:
    def test_off_by_default_with_the_documented_values(self):
        config = InjectConfig()
        assert not config.enable and config.levels == (4, 5) and config.num_injected == 1
        assert (config.source, config.key_field, config.shaping_gamma) == ("file", "index", 0.1)
        assert config.on_policy_group_stats is False
        assert KarlConfig().inject == config

    def test_levels_by_number_or_name(self):
        assert InjectConfig(levels=["completely incorrect", 4, "4"]).levels == (4, 5)
        assert InjectConfig(levels=3).levels == (3,)
        with pytest.raises(ConfigError, match=r"karl\.inject\.levels: .*got 6"):
            InjectConfig(levels=[4, 6])
        with pytest.raises(ConfigError, match=r"karl\.inject\.levels: expected at least one level"):
            InjectConfig(levels=[])

    def test_bad_values_name_their_keys(self):
        with pytest.raises(ConfigError) as err:
            InjectConfig.from_mapping({"num_injected": 0, "shaping_gamma": 0, "source": "web", "enable": "yes",
                                       "teacher_timeout_s": -1, "sourse": "file"})
        assert sorted(p.split(":")[0] for p in err.value.problems) == [
            "karl.inject.enable", "karl.inject.num_injected", "karl.inject.shaping_gamma", "karl.inject.source",
            "karl.inject.sourse", "karl.inject.teacher_timeout_s"]

    def test_an_enabled_source_needs_its_inputs(self):
        with pytest.raises(ConfigError, match=r"karl\.inject\.responses_path: needed with karl\.inject\.source=file"):
            InjectConfig(enable=True)
        with pytest.raises(ConfigError) as err:
            InjectConfig(enable=True, source="teacher", teacher_url="localhost:8000")
        assert [p.split(":")[0] for p in err.value.problems] == ["karl.inject.teacher_model", "karl.inject.teacher_url"]
        InjectConfig(enable=True, responses_path="refs.jsonl")
        InjectConfig(enable=True, source="teacher", teacher_url="http://localhost:8000/v1", teacher_model="m")

    def test_num_injected_must_leave_sampled_rollouts(self):
        config = InjectConfig(enable=True, responses_path="refs.jsonl", num_injected=4)
        with pytest.raises(ConfigError, match=r"karl\.inject\.num_injected: expected fewer than .*rollout\.n=4"):
            config.check_group_size(4)
        config.check_group_size(5)
        InjectConfig(num_injected=4).check_group_size(4)  # off: nothing to check

    def test_check_sections_reports_inject_problems_with_the_others(self):
        _, _, problems = KarlConfig.check_sections({"inject": {"enable": True}, "mastery": {"seed": -1}}, None)
        assert [p.split(":")[0] for p in problems] == ["karl.mastery.seed", "karl.inject.responses_path"]
