"""Configuration dataclasses (karl_verl/config.py) and their YAML mirror in the recipes."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from karl_verl.config import (
    REWARD_PRESETS,
    AdvantageConfig,
    ConfigError,
    KarlConfig,
    MasteryConfig,
    RewardConfig,
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
        with pytest.raises(ConfigError, match=r"unknown key\(s\) \['tua'\]"):
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


class TestYamlMirror:
    """The base recipe lists every dataclass field (one source of truth: values stay in code)."""

    def load(self):
        return yaml.safe_load(RECIPE.read_text())

    @pytest.mark.parametrize(
        ("path", "cls"),
        [
            (("karl", "reward"), RewardConfig),
            (("karl", "mastery"), MasteryConfig),
            (("algorithm", "karl"), AdvantageConfig),
        ],
    )
    def test_keys_match_fields(self, path, cls):
        node = self.load()
        for key in path:
            node = node[key]
        assert list(node) == [field.name for field in dataclasses.fields(cls)]

    def test_recipe_builds_the_default_configs(self):
        from omegaconf import OmegaConf

        recipe = OmegaConf.create(self.load())
        assert KarlConfig.from_mapping(recipe.karl) == KarlConfig()
        assert AdvantageConfig.from_mapping(recipe.algorithm.karl) == AdvantageConfig()

    def test_advantage_default_level_follows_the_reward_default_level(self):
        from omegaconf import OmegaConf

        recipe = OmegaConf.create(self.load())
        recipe.karl.reward.default_level = "mostly incorrect"
        assert AdvantageConfig.from_mapping(recipe.algorithm.karl).default_level == "mostly incorrect"


class TestCheckSections:
    def test_valid_sections_build(self):
        reward, mastery, problems = KarlConfig.check_sections({"reward": {"preset": "v1"}}, {"alpha_plus": [1] * 5})
        assert reward == RewardConfig(preset="v1") and mastery == MasteryConfig() and problems == []

    def test_one_error_per_section_and_none_hidden(self):
        reward, mastery, problems = KarlConfig.check_sections(
            {"reward": {"tau": "abc"}, "mastery": {"probe_mode": "guess"}, "extra": 1}, {"alpha_minus": [1, 2]})
        assert reward is None and mastery is None
        assert [p.split(":")[0] for p in problems] == [
            "karl", "karl.reward.tau", "karl.mastery.probe_mode", "algorithm.karl.alpha_minus"]
