"""The recipe's Hydra callback (karl_verl/integration/preflight.py), called directly."""

import pytest
from omegaconf import OmegaConf

from karl_verl.integration.preflight import RequiredKeysCallback, karl_config_problems, unset_keys

REQUIRED = ["data.train_files", "actor_rollout_ref.model.path"]


def config(**karl_mastery):
    return OmegaConf.create({
        "data": {"train_files": "/d/train.parquet"},
        "actor_rollout_ref": {"model": {"path": "/m/qwen"}},
        "trainer": {"v1": {"trainer_mode": "karl"}},
        "algorithm": {"karl": {"alpha_plus": None}},
        "karl": {"reward": {"preset": "karl"}, "mastery": dict(karl_mastery)},
    })


def test_unset_keys_counts_null_empty_and_missing_values():
    cfg = OmegaConf.create({"a": None, "b": "", "c": "???", "d": "x"})
    assert unset_keys(cfg, ["a", "b", "c", "d", "e.f"]) == ["a", "b", "c", "e.f"]


# (mastery settings, expected problem or None)
CASES = [
    ({}, "karl.mastery.source='probe' needs karl.mastery.table_path"),
    ({"source": "blend"}, "karl.mastery.source='blend' needs"),
    ({"table_path": "/t.json"}, None),
    ({"probe_data": "/p.parquet"}, None),
    ({"source": "online"}, None),
    ({"probe_data": "/p.parquet", "probe_mode": "guess"}, "karl.mastery.probe_mode"),
    ({"probe_data": "/p.parquet", "no_such_key": 1}, "unknown key"),
]


@pytest.mark.parametrize(("mastery", "expected"), CASES)
def test_karl_config_problems(mastery, expected):
    problems = karl_config_problems(config(**mastery))
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0]


def test_advantage_weights_are_checked_too():
    cfg = config(table_path="/t.json")
    cfg.algorithm.karl.alpha_plus = [1, 2]
    assert "algorithm.karl.alpha_plus" in karl_config_problems(cfg)[0]


def test_other_trainers_are_not_checked():
    cfg = config()
    cfg.trainer.v1.trainer_mode = "sync"
    assert karl_config_problems(cfg) == []


def test_callback_reports_unset_keys_and_karl_problems_together():
    cfg = config()
    cfg.data.train_files = None
    with pytest.raises(SystemExit) as raised:
        RequiredKeysCallback(REQUIRED).on_job_start(cfg)
    message = str(raised.value)
    assert "data.train_files=..." in message and "actor_rollout_ref.model.path=..." not in message
    assert "karl.mastery.table_path" in message


def test_callback_passes_a_complete_config():
    RequiredKeysCallback(REQUIRED).on_job_start(config(probe_data="/p.parquet"))
