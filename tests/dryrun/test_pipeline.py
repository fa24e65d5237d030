"""The built-in dry run (karl_verl/dryrun/pipeline.py), once end to end, then its stages' outputs."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from karl_verl.dryrun.pipeline import DryRunOptions, compose_recipe, run_dryrun
from karl_verl.mastery import MasteryTable

STAGES = ["data", "model", "config", "dataset", "warm-up", "probe", "rollout", "reward", "advantage", "update"]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dryrun")
    report = run_dryrun(DryRunOptions(workdir=workdir, num_prompts=4, warmup_steps=40, progress=False),
                        say=lambda _: None)
    return workdir, report


def test_every_stage_ran_and_was_timed(dry):
    _, report = dry
    assert list(report.stage_seconds) == STAGES
    assert all(seconds >= 0 for seconds in report.stage_seconds.values())


def test_data_stage_wrote_grounding_and_probe_sets(dry):
    workdir, report = dry
    grounding = pd.read_parquet(report.outputs["grounding"])
    assert len(grounding) == 16  # composites; the step uses the first 4
    assert set(grounding.columns) >= {"data_source", "prompt", "images", "reward_model", "extra_info"}
    probe = pd.read_parquet(report.outputs["probe"])
    assert len(probe) > 0 and {"entity", "category", "image"} <= set(probe.columns)


def test_probe_stage_wrote_a_mastery_table_covering_the_training_entities(dry):
    _, report = dry
    table = MasteryTable.load(report.outputs["mastery"])
    assert len(table) == report.mastery_entities > 0
    assert sum(table.distribution().values()) == len(table)
    assert report.mastery_coverage == 1.0


def test_rollout_reward_and_advantage_per_level(dry):
    _, report = dry
    assert report.samples == 4 * 4  # 4 prompts x n=4 from the recipe
    assert sum(stats.samples for stats in report.per_level.values()) == report.samples
    for stats in report.per_level.values():
        assert -0.6 <= stats.reward <= 2.0 and 0.0 <= stats.iou <= 1.0 and 0.0 <= stats.acc <= 1.0
    # Group-normalised advantages average to 0 within each group, and a group has one level.
    assert all(abs(stats.advantage) < 1e-5 for stats in report.per_level.values())
    assert 0.0 <= report.format_rate <= 1.0 and 0.0 <= report.parse_rate <= 1.0


def test_level_weights_reach_the_advantage(dry, tmp_path):
    """Same seed, weights w_k = k + 1 on both signs: each level's mean |advantage| is (k + 1) times larger."""
    _, base = dry
    weights = "[2,3,4,5,6]"
    report = run_dryrun(DryRunOptions(workdir=tmp_path, num_prompts=4, warmup_steps=40, progress=False,
                                      extra_overrides=(f"algorithm.karl.alpha_plus={weights}",
                                                       f"algorithm.karl.alpha_minus={weights}")),
                        say=lambda _: None)
    assert report.per_level.keys() == base.per_level.keys()
    assert any(stats.abs_advantage > 0 for stats in base.per_level.values())
    for level, stats in report.per_level.items():
        assert stats.abs_advantage == pytest.approx((level + 1) * base.per_level[level].abs_advantage, rel=1e-5)


def test_an_ablation_recipe_runs_through_the_same_stages(tmp_path):
    report = run_dryrun(DryRunOptions(workdir=tmp_path, num_prompts=2, warmup_steps=5, progress=False,
                                      recipe="karl_kvg_grpo"), say=lambda _: None)
    assert list(report.stage_seconds) == STAGES and report.weights_changed
    # preset "uniform": a miss scores 0, never a negative scale
    assert all(stats.reward >= 0.0 for stats in report.per_level.values())


def test_policy_step_ran_through_verl_ppo_loss(dry):
    _, report = dry
    assert report.loss is not None and report.loss == report.loss  # finite, not NaN
    assert "kl_loss" in report.loss_metrics or "kl_coef" in report.loss_metrics
    assert report.weights_changed


def test_report_is_readable(dry):
    _, report = dry
    text = report.format()
    for word in ("completely correct", "completely incorrect", "format reward", "mastery", "time per stage", "|adv|"):
        assert word in text


def test_recipe_composition_uses_karl_parts():
    config = compose_recipe("karl_kvg", ["data.train_files=/x"])
    assert config.algorithm.adv_estimator == "karl_grpo"
    assert config.reward.reward_manager.name == "karl"


def test_command_line_writes_a_json_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "karl_verl", "dryrun", "--workdir", str(tmp_path), "--prompts", "2",
         "--warmup-steps", "5", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "time per stage" in result.stdout
    summary = json.loads((tmp_path / "dryrun_report.json").read_text())
    assert summary["samples"] == 8 and set(summary["stage_seconds"]) == set(STAGES)
