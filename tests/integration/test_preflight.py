"""The recipe's Hydra callback (karl_verl/integration/preflight.py), called directly."""

import os

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




# ---- paths, wandb and GPUs (karl_verl.integration.preflight.run_problems) ----

from karl_verl.integration.preflight import gpu_problem, path_problems, run_problems, wandb_problem  # noqa: E402


@pytest.fixture()
def inputs(tmp_path):
    """A run's input files that exist: data, a model directory with config.json, a table, a probe set."""
    for name in ("train.parquet", "val.parquet", "mastery.json", "probe.parquet"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path


def run_config(inputs, **overrides):
    cfg = OmegaConf.create({
        "data": {"train_files": [str(inputs / "train.parquet")], "val_files": str(inputs / "val.parquet")},
        "actor_rollout_ref": {"model": {"path": str(inputs / "model")}},
        "trainer": {"v1": {"trainer_mode": "karl"}, "logger": ["console"], "nnodes": 1, "n_gpus_per_node": 8,
                    "device": "cuda", "default_local_dir": str(inputs / "ckpt")},
        "reward": {"reward_manager": {"name": "karl"}},
        "karl": {"mastery": {"table_path": str(inputs / "mastery.json"), "probe_data": str(inputs / "probe.parquet")}},
    })
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_existing_inputs_have_no_path_problem(inputs):
    assert path_problems(run_config(inputs)) == []


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("data.train_files", ["/no/train.parquet"], "data.train_files: training data /no/train.parquet does not exist"),
    ("data.val_files", "/no/val.parquet", "data.val_files: validation data /no/val.parquet does not exist"),
    ("karl.mastery.table_path", "/no/m.json", "karl.mastery.table_path: mastery table /no/m.json does not exist"),
    ("karl.reward.mastery_path", "/no/m.json", "karl.reward.mastery_path: mastery table /no/m.json does not exist"),
    ("karl.mastery.probe_data", "/no/p.parquet", "karl.mastery.probe_data: probe set /no/p.parquet does not exist"),
    ("karl.inject.responses_path", "/no/r.jsonl",
     "karl.inject.responses_path: reference responses /no/r.jsonl does not exist"),
    ("actor_rollout_ref.model.path", "/no/model", "actor_rollout_ref.model.path: model /no/model does not exist"),
])
def test_each_missing_path_is_named(inputs, key, value, expected):
    assert path_problems(run_config(inputs, **{key: value})) == [expected]


def test_a_model_directory_without_config_json(inputs):
    (inputs / "model" / "config.json").unlink()
    model = inputs / "model"
    assert path_problems(run_config(inputs)) == [
        f"actor_rollout_ref.model.path: {model} is not a Hugging Face model directory (no config.json in it)"]


def test_an_unreadable_file(inputs):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    (inputs / "val.parquet").chmod(0)
    expected = f"data.val_files: validation data {inputs / 'val.parquet'} is not readable"
    assert path_problems(run_config(inputs)) == [expected]


def test_hub_ids_and_remote_paths_are_left_to_verl(inputs):
    cfg = run_config(inputs, **{"actor_rollout_ref.model.path": "Qwen/Qwen3-VL-8B-Instruct",
                                "data.train_files": ["hdfs://cluster/train.parquet"]})
    assert path_problems(cfg) == []


@pytest.mark.parametrize(("environ", "stops"), [
    ({}, True), ({"WANDB_MODE": "offline"}, False), ({"WANDB_MODE": "disabled"}, False),
    ({"WANDB_API_KEY": "k" * 40}, False), ({"WANDB_MODE": "online"}, True),
])
def test_wandb_without_credentials(inputs, tmp_path, environ, stops):
    cfg = run_config(inputs, **{"trainer.logger": ["console", "wandb"]})
    problem = wandb_problem(cfg, {"HOME": str(tmp_path), **environ})
    assert (problem is not None) == stops
    if stops:
        assert "wandb login" in problem and "WANDB_MODE=offline" in problem and "trainer.logger=[console]" in problem


def test_wandb_login_in_netrc_is_credentials(inputs, tmp_path):
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    cfg = run_config(inputs, **{"trainer.logger": ["console", "wandb"]})
    assert wandb_problem(cfg, {"HOME": str(tmp_path)}) is None


def test_console_only_needs_no_wandb(inputs, tmp_path):
    assert wandb_problem(run_config(inputs), {"HOME": str(tmp_path)}) is None


@pytest.mark.parametrize(("overrides", "environ", "gpus", "stops"), [
    ({}, {}, 0, True), ({}, {}, 4, True), ({}, {}, 8, False),
    ({"trainer.device": "cpu"}, {}, 0, False),
    ({}, {"RAY_ADDRESS": "10.0.0.1:6379"}, 0, False),
    ({"ray_kwargs.ray_init.address": "auto"}, {}, 0, False),
    ({"trainer.nnodes": 2}, {}, 0, False),
])
def test_too_few_gpus(inputs, overrides, environ, gpus, stops):
    problem = gpu_problem(run_config(inputs, **overrides), environ, count_gpus=lambda: gpus)
    assert (problem is not None) == stops
    if stops:
        assert problem.startswith("trainer.n_gpus_per_node: 8 GPUs asked for")


def test_run_problems_lists_everything_at_once(inputs, tmp_path):
    cfg = run_config(inputs, **{"data.val_files": "/no/val.parquet", "trainer.logger": ["wandb"],
                                "karl.reward": {"tau": 1.5}, "trainer.default_local_dir": None})
    unset, problems = run_problems(cfg, ["trainer.default_local_dir"], {"HOME": str(tmp_path)}, count_gpus=lambda: 0)
    assert unset == ["trainer.default_local_dir"]
    assert [p.split(":")[0] for p in problems] == [
        "data.val_files", "karl.reward.tau", "trainer.logger", "trainer.n_gpus_per_node"]


def test_callback_passes_a_complete_config(inputs):
    callback = RequiredKeysCallback(REQUIRED)
    callback.on_run_start(run_config(inputs, **{"trainer.device": "cpu"}))
    callback.on_job_start(run_config(inputs, **{"trainer.device": "cpu"}))


def test_callback_checks_at_run_start_before_hydra_makes_its_output_folder(inputs):
    with pytest.raises(SystemExit, match="data.val_files: validation data /no/val.parquet does not exist"):
        RequiredKeysCallback(REQUIRED).on_run_start(run_config(inputs, **{"data.val_files": "/no/val.parquet",
                                                                          "trainer.device": "cpu"}))


def test_empty_paths_are_left_to_the_unset_key_check(inputs):
    cfg = run_config(inputs, **{"data.val_files": "", "actor_rollout_ref.model.path": "???"})
    assert path_problems(cfg) == []
    assert unset_keys(cfg, ["data.val_files", "actor_rollout_ref.model.path"]) == [
        "data.val_files", "actor_rollout_ref.model.path"]


@pytest.mark.parametrize(("metric", "stops"), [("success", False), ("reward", False), ("acc", False),
                                               ("sucess", True), ("seq_reward", True)])
def test_dynamic_sampling_on_a_key_the_karl_reward_lacks(metric, stops):
    from karl_verl.integration.preflight import filter_groups_problem

    config = OmegaConf.create({"reward": {"reward_manager": {"name": "karl"}, "custom_reward_function": {"path": None}},
                               "algorithm": {"filter_groups": {"enable": True, "metric": metric}}})
    problem = filter_groups_problem(config)
    assert (problem is not None) == stops
    if stops:
        assert problem.startswith("algorithm.filter_groups.metric:") and "success" in problem
    config.algorithm.filter_groups.enable = False
    assert filter_groups_problem(config) is None


def test_a_multi_node_run_is_told_which_paths_every_node_must_see(inputs, capsys):
    from karl_verl.integration.preflight import shared_filesystem_notice

    assert shared_filesystem_notice(run_config(inputs)) is None  # one node
    cfg = run_config(inputs, **{"trainer.nnodes": 2, "data.val_files": "hdfs://cluster/val.parquet"})
    notice = shared_filesystem_notice(cfg)
    for key in ("trainer.default_local_dir", "karl.mastery.table_path", "karl.mastery.probe_data",
                "data.train_files", "actor_rollout_ref.model.path"):
        assert f"  {key}: " in notice
    assert "hdfs://" not in notice and "trainer.nnodes=2" in notice
    # The callback prints it before Ray starts (a notice: the run goes on).
    RequiredKeysCallback(()).on_job_start(cfg)
    assert "every node mounts" in capsys.readouterr().err


def _vllm_rollout(model_dir, **rollout):
    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": str(model_dir)},
                              "rollout": {"name": "vllm", "enable_chunked_prefill": False,
                                          "max_num_batched_tokens": 8192, "max_model_len": None, **rollout}},
    })


@pytest.mark.parametrize(("rollout", "positions", "stops"), [
    ({"max_model_len": 8192}, 262144, None),  # karl_kvg's setting
    ({"max_model_len": 16384}, 262144, "max_num_batched_tokens=8192 is below actor_rollout_ref.rollout.max_model_len"),
    ({}, 262144, "below the model's max_position_embeddings (actor_rollout_ref.rollout.max_model_len unset) (262144)"),
    ({}, 4096, None),  # a model whose whole context fits one batch
    ({"max_model_len": 16384, "enable_chunked_prefill": True}, 262144, None),
    ({"max_model_len": 16384, "name": "sglang"}, 262144, None),
])
def test_vllm_without_chunked_prefill_needs_max_model_len_within_a_batch(tmp_path, rollout, positions, stops):
    """verl 0.9.1's vLLM server assigns a frozen field, and the run dies at start, in exactly the stopped cases."""
    import json

    from karl_verl.integration.preflight import run_problems, vllm_batched_tokens_problem

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": positions}}))
    problem = vllm_batched_tokens_problem(_vllm_rollout(tmp_path, **rollout))
    if stops is None:
        assert problem is None
    else:
        assert stops in problem and "FrozenInstanceError" in problem
        assert problem in run_problems(_vllm_rollout(tmp_path, **rollout), [], environ={}, count_gpus=lambda: 8)[1]


def test_an_unreadable_model_config_with_unset_max_model_len_is_named(tmp_path):
    from karl_verl.integration.preflight import vllm_batched_tokens_problem

    problem = vllm_batched_tokens_problem(_vllm_rollout("Qwen/Qwen3-VL-8B-Instruct"))
    assert problem.startswith("actor_rollout_ref.rollout.max_model_len: unset, with enable_chunked_prefill=false")


@pytest.mark.parametrize("recipe", ["karl_kvg", "karl_kvg_cpu_vllm"])
def test_the_vllm_recipes_fit_a_whole_sequence_in_a_batch(recipe):
    from karl_verl.dryrun.pipeline import compose_recipe
    from karl_verl.integration.preflight import vllm_batched_tokens_problem

    config = compose_recipe(recipe, ["actor_rollout_ref.model.path=Qwen/Qwen3-VL-8B-Instruct"])
    rollout = config.actor_rollout_ref.rollout
    assert rollout.name == "vllm" and rollout.enable_chunked_prefill is False
    assert config.data.max_prompt_length + config.data.max_response_length <= rollout.max_model_len
    assert vllm_batched_tokens_problem(config) is None
    if recipe == "karl_kvg_cpu_vllm":  # what vLLM on CPU cannot do
        assert rollout.enable_sleep_mode is False and rollout.enforce_eager is True


def test_ivgr_needs_a_judge_that_answers_and_valid_templates(tmp_path):
    """karl.ivgr.enable: the judge's <url>/models must answer, a templates file must be valid, no dynamic sampling."""
    from karl_verl.integration.preflight import ivgr_problems
    from karl_verl.judge import RuleJudgeServer

    def config(**ivgr):
        return OmegaConf.create({"trainer": {"v1": {"trainer_mode": "karl"}}, "algorithm": {},
                                 "karl": {"ivgr": {"enable": True, **ivgr}}})

    with RuleJudgeServer() as judge:
        assert ivgr_problems(config(judge_url=judge.url)) == []
        templates = tmp_path / "t.yaml"
        templates.write_text("textual: no placeholder\n")
        [problem] = ivgr_problems(config(judge_url=judge.url, templates_path=str(templates)))
        assert problem.startswith("karl.ivgr.templates_path:") and "placeholder" in problem
        dynamic = config(judge_url=judge.url)
        dynamic.algorithm.filter_groups = {"enable": True}
        assert ivgr_problems(dynamic) == [
            "karl.ivgr.enable: not supported with algorithm.filter_groups.enable=true (dynamic sampling drops one "
            "stream's group without the other's); turn one of them off"]
    [problem] = ivgr_problems(config(judge_url=judge.url), timeout_s=1.0)  # stopped: nothing listens there
    assert problem.startswith("karl.ivgr.judge_url: the judge does not answer: GET http://127.0.0.1:")
    assert ivgr_problems(config(enable=False)) == []
    assert ivgr_problems(config(judge_url="local")) == []  # the trainer serves it: nothing to reach before Ray


def test_a_reference_file_holding_a_vision_token_stops_the_run_before_ray(tmp_path):
    """karl.inject.responses_path is read before Ray: a response with <|image_pad|> is named with file, line, key."""
    import json

    from karl_verl.dryrun.pipeline import compose_recipe

    references = tmp_path / "references.jsonl"
    references.write_text(json.dumps({"key": 1, "response": "fine"}) + "\n"
                          + json.dumps({"key": 2, "response": "an <|image_pad|> here"}) + "\n")
    overrides = ["karl.inject.enable=true", f"karl.inject.responses_path={references}",
                 "actor_rollout_ref.rollout.agent.default_agent_loop=karl_inject_agent"]
    problems = karl_config_problems(compose_recipe("karl_kvg_cpu", overrides))
    expected = (f"karl.inject.responses_path: {references} line 2: key '2': 'response' holds '<|image_pad|>', "
                "a vision special token")
    [problem] = [p for p in problems if "inject" in p]
    assert problem.startswith(expected), problems
    references.write_text(json.dumps({"key": 2, "response": "an image here"}) + "\n")
    assert not [p for p in karl_config_problems(compose_recipe("karl_kvg_cpu", overrides)) if "inject" in p]


def _teacher_overrides(url):
    return ["karl.inject.enable=true", "karl.inject.source=teacher", f"karl.inject.teacher_url={url}",
            "karl.inject.teacher_model=teacher", "actor_rollout_ref.rollout.agent.default_agent_loop=karl_inject_agent"]


def test_a_teacher_that_does_not_answer_stops_the_run_before_ray(monkeypatch):
    """karl.inject.source=teacher: the teacher's <url>/models must answer from the launching machine; with a Ray
    cluster to join, from each of its nodes too (the node check is stubbed here; the real one runs on two Ray
    nodes in tests/integration/test_reach.py)."""
    from karl_verl.dryrun.pipeline import compose_recipe
    from karl_verl.integration import reach
    from karl_verl.judge import RuleJudgeServer

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    asked = []

    def nodes_without_reply(url, address, **kwargs):
        asked.append((url, address))
        return {"10.0.0.7 (node 3f2a9c0d1e4b)": f"GET {url}/models failed (timed out)"}

    monkeypatch.setattr(reach, "nodes_without_reply", nodes_without_reply)
    with RuleJudgeServer() as teacher:  # any OpenAI-compatible server with a model list
        config = compose_recipe("karl_kvg_cpu", _teacher_overrides(teacher.url))
        assert not [p for p in karl_config_problems(config) if "teacher" in p] and asked == []  # no cluster: no nodes
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        [problem] = [p for p in karl_config_problems(config) if "teacher" in p]
        assert asked == [(teacher.url, "10.0.0.1:6379")]
        assert problem.startswith(f"karl.inject.teacher_url: the teacher does not answer from 10.0.0.7 (node "
                                  f"3f2a9c0d1e4b): GET {teacher.url}/models failed (timed out)")
        monkeypatch.delenv("RAY_ADDRESS")
    [problem] = [p for p in karl_config_problems(config) if "teacher" in p]  # stopped: nothing listens there
    assert problem.startswith("karl.inject.teacher_url: the teacher does not answer from this machine: "
                              f"GET {teacher.url}/models failed")


def test_the_dry_run_preflight_asks_the_teacher_too(monkeypatch, tmp_path):
    from karl_verl.dryrun.preflight import run_preflight
    from karl_verl.judge import RuleJudgeServer

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with RuleJudgeServer() as teacher:
        url = teacher.url
        report = run_preflight("karl_kvg_cpu", _teacher_overrides(url), max_rows=10)
        assert not [p for p in report.problems if "teacher" in p.where]
    report = run_preflight("karl_kvg_cpu", _teacher_overrides(url), max_rows=10)
    [problem] = [p for p in report.problems if p.where == "karl.inject.teacher_url"]
    assert problem.message.startswith(f"the teacher does not answer from this machine: GET {url}/models failed")
