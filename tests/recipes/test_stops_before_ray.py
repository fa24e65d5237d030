"""``main_ppo +recipe=karl_kvg`` stops on every cheap mistake before Ray starts, with one message.

Each run goes through verl's real ``main_ppo`` in a subprocess whose ``ray.init`` is replaced by
one that leaves a marker file and exits, so a run that got as far as starting Ray is seen as such.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = """
import runpy, sys
import ray

marker, *args = sys.argv[1:]

def refuse(*args, **kwargs):
    open(marker, "w").write("ray.init called")
    raise SystemExit(99)

ray.init = refuse
sys.argv = ["main_ppo", *args]
runpy.run_module("verl.trainer.main_ppo", run_name="__main__")
"""


@pytest.fixture()
def inputs(tmp_path):
    for name in ("train.parquet", "val.parquet", "mastery.json", "probe.parquet"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    (tmp_path / "home").mkdir()
    # Reference responses for knowledge injection, one writing out an image placeholder.
    (tmp_path / "home" / "references.jsonl").write_text(
        json.dumps({"key": 0, "response": "<think>The Fiat 500.</think>"}) + "\n"
        + json.dumps({"key": 1, "response": "<think>It is <|image_pad|> the Fiat 500.</think>"}) + "\n")
    return tmp_path


def good_overrides(inputs: Path) -> dict[str, str]:
    """A run with every input present; only the GPU check (this machine may have none) is left."""
    return {
        "data.train_files": str(inputs / "train.parquet"), "data.val_files": str(inputs / "val.parquet"),
        "actor_rollout_ref.model.path": str(inputs / "model"), "trainer.default_local_dir": str(inputs / "ckpt"),
        "karl.mastery.table_path": str(inputs / "mastery.json"),
        "karl.mastery.probe_data": str(inputs / "probe.parquet"), "trainer.logger": "[console]",
        "trainer.n_gpus_per_node": "1024",
    }


def main_ppo(inputs: Path, overrides: dict[str, str | None], environ: dict[str, str] | None = None):
    args = ["+recipe=karl_kvg"] + [f"{key}={value}" for key, value in overrides.items() if value is not None]
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("WANDB_", "RAY_")) and key != "NETRC"}
    environment.update({"HOME": str(inputs / "home"), **(environ or {})})
    workdir = inputs / "cwd"
    workdir.mkdir(exist_ok=True)
    marker = inputs / "ray-started"
    result = subprocess.run([sys.executable, "-c", LAUNCH, str(marker), *args], cwd=workdir, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert not marker.exists() and "ray init kwargs" not in result.stdout, "Ray was started"
    assert list(workdir.iterdir()) == [], "the run wrote into the working directory"
    assert not (inputs / "ckpt").exists(), "Hydra made its output folder before the check"
    return result


# (overrides on top of good_overrides, extra environment, expected line in the message)
MISTAKES = {
    "data": ({"data.train_files": "/no/such/train.parquet"}, {},
             "data.train_files: training data /no/such/train.parquet does not exist"),
    "model": ({"actor_rollout_ref.model.path": "/no/such/model"}, {},
              "actor_rollout_ref.model.path: model /no/such/model does not exist"),
    "model_without_config": ({"actor_rollout_ref.model.path": "{home}"}, {},
                             "is not a Hugging Face model directory (no config.json in it)"),
    "mastery_table": ({"karl.mastery.table_path": "/no/such/mastery.json"}, {},
                      "karl.mastery.table_path: mastery table /no/such/mastery.json does not exist"),
    "probe_set": ({"karl.mastery.probe_data": "/no/such/probe.parquet"}, {},
                  "karl.mastery.probe_data: probe set /no/such/probe.parquet does not exist"),
    "wandb": ({"trainer.logger": "[console,wandb]"}, {}, "wandb has no credentials"),
    "karl_value": ({"karl.reward.tau": "1.5", "karl.reward.tua": "0.5"}, {},
                   "karl.reward.tau: expected a number in (0.0, 1.0], got 1.5"),
    "unset": ({"data.val_files": None}, {}, "  data.val_files=..."),
    "inject_without_references": ({"karl.inject.enable": "true"}, {},
                                  "karl.inject.responses_path: needed with karl.inject.source=file"),
    "inject_references": ({"karl.inject.enable": "true", "karl.inject.responses_path": "/no/such/refs.jsonl"}, {},
                          "karl.inject.responses_path: reference responses /no/such/refs.jsonl does not exist"),
    # karl_kvg's agent loop, not karl_kvg_inject's: found before Ray, not once the workers are up.
    "inject_agent_loop": ({"karl.inject.enable": "true", "karl.inject.responses_path": "{home}"}, {},
                          "actor_rollout_ref.rollout.agent.default_agent_loop: karl.inject.enable needs "
                          "'karl_inject_agent'"),
    # A reference holding a vision special token would become an image token without an image in the actor.
    "inject_vision_token": ({"karl.inject.enable": "true", "karl.inject.responses_path": "{home}/references.jsonl",
                             "actor_rollout_ref.rollout.agent.default_agent_loop": "karl_inject_agent"}, {},
                            "references.jsonl line 2: key '1': 'response' holds '<|image_pad|>', a vision special "
                            "token"),
    # verl's agent-loop workers call the teacher from every node: here nothing answers on this machine either.
    "inject_teacher": ({"karl.inject.enable": "true", "karl.inject.source": "teacher",
                        "karl.inject.teacher_url": "http://127.0.0.1:9/v1", "karl.inject.teacher_model": "t",
                        "actor_rollout_ref.rollout.agent.default_agent_loop": "karl_inject_agent"}, {},
                       "karl.inject.teacher_url: the teacher does not answer from this machine: "
                       "GET http://127.0.0.1:9/v1/models failed"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_mistake_stops_the_run_before_ray(inputs, mistake):
    changes, environ, expected = MISTAKES[mistake]
    overrides = {**good_overrides(inputs), **{k: v and v.format(home=inputs / "home") for k, v in changes.items()}}
    if mistake == "unset":
        overrides = {k: v for k, v in overrides.items() if k not in changes}
    result = main_ppo(inputs, overrides, environ)
    assert result.returncode == 1, result.stderr[-3000:]
    assert expected in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if mistake == "wandb":
        assert "wandb login" in result.stderr and "WANDB_MODE=offline" in result.stderr
    if mistake == "karl_value":
        assert "karl.reward.tua: unknown key; did you mean karl.reward.tau?" in result.stderr


def test_all_mistakes_in_one_message(inputs):
    overrides = {**good_overrides(inputs), "data.train_files": "/no/such/train.parquet",
                 "karl.mastery.probe_data": "/no/such/probe.parquet", "trainer.logger": "[console,wandb]",
                 "karl.mastery.seed": "-1"}
    result = main_ppo(inputs, overrides)
    assert result.returncode == 1
    for expected in ("data.train_files:", "karl.mastery.probe_data:", "trainer.logger:", "karl.mastery.seed:",
                     "trainer.n_gpus_per_node: 1024 GPUs asked for"):
        assert expected in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(("overrides", "environ"), [
    ({}, {}),
    ({"trainer.device": "cpu"}, {"WANDB_MODE": "offline"}),
    ({}, {"RAY_ADDRESS": "127.0.0.1:1"}),
])
def test_gpu_count_is_checked_only_for_a_local_gpu_run(inputs, overrides, environ):
    """A missing probe set keeps each run from reaching Ray; the GPU line appears only when it applies."""
    result = main_ppo(inputs, {**good_overrides(inputs), "karl.mastery.probe_data": "/no/such/probe.parquet",
                               **overrides}, environ)
    assert result.returncode == 1 and "karl.mastery.probe_data" in result.stderr
    asked = "trainer.n_gpus_per_node: 1024 GPUs asked for" in result.stderr
    assert asked == (not overrides and not environ), result.stderr[-3000:]


def test_a_run_that_passes_keeps_hydra_output_with_its_checkpoints(inputs):
    """The checks pass, so main_ppo reaches ray.init (trapped here); Hydra wrote under default_local_dir."""
    workdir = inputs / "cwd"
    workdir.mkdir()
    marker = inputs / "ray-started"
    args = ["+recipe=karl_kvg", *(f"{k}={v}" for k, v in good_overrides(inputs).items()), "trainer.device=cpu",
            "trainer.n_gpus_per_node=1"]
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "RAY_"))}
    result = subprocess.run([sys.executable, "-c", LAUNCH, str(marker), *args], cwd=workdir,
                            env={**environment, "HOME": str(inputs / "home")}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 99 and marker.exists(), result.stderr[-3000:]
    assert list(workdir.iterdir()) == []
    (run_dir,) = (inputs / "ckpt" / "hydra").iterdir()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
