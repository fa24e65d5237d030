"""Faults on the real CPU path: a crash mid-epoch and a resume, a failing refresh, a raising reward.

Each test reads verl's real main_ppo (karl_kvg_cpu) run in child processes; the inputs (data and the
warmed-up tiny model) are the dry run's own, for the failing refresh with Qwen3-VL-8B's image geometry on
photo-sized images. The crash is conftest's ``curriculum_runs``.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from sized_data import expected_prompt_lengths, resize_grounding_images

from karl_verl.dryrun.pipeline import DryRunOptions, train, training_overrides
from karl_verl.integration.trainer import STATE_FILE
from karl_verl.testing.tiny_qwen3vl import load_tiny_processor, set_image_geometry

pytestmark = pytest.mark.slow

FAULTS = Path(__file__).resolve().parents[1] / "_support" / "cpu_faults"  # a sitecustomize.py
TIMING_KEYS = {"wall_time_s"}
#: Image sizes of the faults run's prompts (photo sizes, for prompts of the 8B's length), and its precision.
SIZES_8B = ((448, 448), (1024, 768))
FLOAT32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"



def _comparable(state):
    history = [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in state["history"]]
    return state["table"]["entities"], history


def test_sigkill_in_the_second_epoch_then_resume_ends_like_an_uninterrupted_run(curriculum_runs):
    """(a) SIGKILL of the whole run (driver, Ray, workers) after step 3, i.e. in epoch 2 after the
    step-2 checkpoint, with the prompt curriculum on; a new main_ppo resumes and ends with the
    uninterrupted run's table, refresh history and step (conftest's ``curriculum_runs``)."""
    runs = curriculum_runs
    assert runs.crashed.killed_after_step == 3 and runs.crashed.returncode != 0
    assert [int(r["step"]) for r in runs.crashed.steps] == [1, 2, 3]
    assert runs.latest_after_crash == "2"
    assert [int(r["step"]) for r in runs.resumed.steps] == [3, 4]
    checkpoints = runs.checkpoints("resumed")
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    ours = json.loads((checkpoints / "global_step_4" / STATE_FILE).read_text())
    reference = json.loads((runs.checkpoints("full") / "global_step_4" / STATE_FILE).read_text())
    assert _comparable(ours) == _comparable(reference)
    assert len(ours["history"]) == 2  # the probe at train begin and the refresh before epoch 2


def test_a_failing_refresh_keeps_the_table_and_a_raising_reward_scores_a_miss(dry_run, tmp_path):
    """(b) The rollout server raises on every probe request after the first weight syncs: the refresh
    before epoch 2 fails, training goes on with the previous table and logs karl/refresh/failed.
    (c) A reward worker raises on one sample: it scores as a miss and the run goes on.
    (d) All of it on prompts of Qwen3-VL-8B's length: the dry run's warmed-up model takes the 8B's image
    geometry and its composites are stretched to 448x448 and 1024x768 (196 and 768 image tokens; the probe's
    64x64 images are scaled up to the 8B's floor, 64 tokens), and the prompt lengths verl logs are those
    counted here.

    The actor and the reference compute in float32 here, not in the CPU recipe's bfloat16 autocast: under it
    the vision tower's patch embedding (a Conv3d) runs PyTorch's slow CPU bfloat16 conv3d, whose backward
    took 16 s for two 1024x768 images against 0.17 s in float32 (in-process, 1 thread), and this run's
    update_actor 52 s at step 1 against 6 s in float32 (2 cores)."""
    paths = {**dry_run.paths, "grounding": resize_grounding_images(dry_run.paths["grounding"],
                                                                   tmp_path / "grounding.parquet", SIZES_8B)}
    paths["model"] = set_image_geometry(shutil.copytree(dry_run.paths["model"], tmp_path / "model"), "qwen3_vl_8b")
    options = DryRunOptions(workdir=tmp_path, progress=False, num_prompts=8, steps_per_epoch=2,
                            extra_overrides=tuple(f"+actor_rollout_ref.{role}.fsdp_config.mixed_precision={FLOAT32}"
                                                  for role in ("actor", "ref")))
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "KARL_TEST_FAIL_PROBE_AFTER_SYNCS": "2",
        "KARL_TEST_FAIL_REWARD_ONCE": "1",
    }
    overrides = training_overrides(options, paths, checkpoints=tmp_path / "checkpoints",
                                   hydra_dir=tmp_path / "hydra", total_epochs=2, total_steps=3)
    run = train(options, paths, "faults", overrides, 3, env=env)
    assert run.ok, run.log_tail()
    data = [record["data"] for record in run.steps]
    assert [int(r["step"]) for r in run.steps] == [1, 2, 3]
    assert data[0]["karl/refresh/ok"] == 1  # the probe at train begin worked
    assert data[2]["karl/refresh/failed"] == 1 and data[2]["karl/refresh/failures_total"] == 1
    assert "karl/mastery/num_entities" not in data[2]  # no new table was installed
    assert sum(d["karl/reward/errors"] for d in data) == 1
    assert all(d["karl/level/reward_level_mismatch"] == 0 for d in data)
    state = json.loads((tmp_path / "checkpoints" / "global_step_3" / STATE_FILE).read_text())
    assert [record["status"] for record in state["history"]] == ["ok", "failed"]
    assert "injected rollout-server fault" in state["history"][1]["error"]
    assert state["table"]["entities"] == json.loads(
        (tmp_path / "checkpoints" / "global_step_2" / STATE_FILE).read_text())["table"]["entities"]
    # (d) Epoch 1 (steps 1 and 2) holds every prompt once: its shortest and longest are the data's.
    lengths = expected_prompt_lengths(load_tiny_processor(paths["model"]), paths["grounding"])
    assert min(lengths) > 196 and max(lengths) > 768  # 1 and 4 image tokens with the tiny geometry
    assert min(d["prompt_length/min"] for d in data[:2]) == min(lengths)
    assert max(d["prompt_length/max"] for d in data[:2]) == max(lengths)
    assert all({d["prompt_length/min"], d["prompt_length/max"]} <= set(lengths) for d in data)
