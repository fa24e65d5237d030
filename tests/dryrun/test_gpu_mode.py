"""The GPU smoke test's every part that needs no GPU (karl_verl/dryrun/gpu.py, its use in pipeline.py and the
command): the device choice, the main_ppo overrides composed with verl's real config and accepted by verl's
validation and karl-verl's pre-flight, the child's environment without the CPU layer, the log evidence and
the verdict. Nothing here starts main_ppo: tests/gpu/test_gpu_smoke.py runs the whole thing on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from karl_verl.dryrun import gpu
from karl_verl.dryrun.gpu import (
    ATTENTION_LOG_PREFIX,
    GPU_COUNTS,
    GPU_RECIPE,
    MAX_MODEL_LEN,
    GpuOptionError,
    GpuSetup,
    LogEvidence,
    choose_device,
    choose_gpus,
    gpu_overrides,
    gpu_training_environment,
    gpu_verdict,
    read_log_evidence,
)
from karl_verl.dryrun.launch import RunResult
from karl_verl.dryrun.pipeline import DryRunOptions, DryRunReport, training_overrides
from karl_verl.gpu_stack import AttentionChoice

#: The CPU layer's variables (karl_verl/cpu/__init__.py): none may reach a GPU run.
CPU_LAYER_VARIABLES = ("KARL_VERL_CPU", "VERL_PLATFORM", "VERL_ENGINE_DEVICE", "VLLM_TARGET_DEVICE",
                       "VLLM_MLA_DISABLE", "VLLM_CPU_KVCACHE_SPACE")
REQUIRED = ("data.train_files", "data.val_files", "actor_rollout_ref.model.path", "trainer.default_local_dir")


def as_dict(overrides: list[str]) -> dict[str, str]:
    keys = [o.split("=", 1)[0] for o in overrides]
    assert len(keys) == len(set(keys)), f"a key set twice: {sorted(k for k in keys if keys.count(k) > 1)}"
    return dict(o.split("=", 1) for o in overrides)


def paths_under(root: Path) -> dict[str, Path]:
    return {"grounding": root / "data" / "grounding.parquet", "probe": root / "data" / "probe.parquet",
            "model": root / "tiny-qwen3-vl"}


def gpu_options(workdir: Path, gpus: int = 1, **changes) -> DryRunOptions:
    return DryRunOptions(workdir=workdir, recipe=GPU_RECIPE, rollout="vllm", device="cuda", gpus=gpus, **changes)


def run_overrides(options: DryRunOptions, root: Path) -> list[str]:
    return training_overrides(options, paths_under(root), checkpoints=root / "checkpoints",
                              hydra_dir=root / "hydra" / "run1", total_epochs=options.epochs)


# --- the overrides -----------------------------------------------------------------------------------------


def test_gpu_overrides_change_sizes_only_and_keep_the_real_runs_code_paths():
    overrides = as_dict(gpu_overrides(2, 0.25))
    rollout = "actor_rollout_ref.rollout"
    assert overrides["trainer.device"] == "cuda" and overrides["trainer.n_gpus_per_node"] == "2"
    assert overrides[f"{rollout}.name"] == "vllm" and overrides[f"{rollout}.gpu_memory_utilization"] == "0.25"
    assert overrides["trainer.logger"] == "[console,file]"  # the file logger feeds the report; no wandb
    # Without chunked prefill (karl_kvg) prompt + response must fit a batch, and vLLM refuses a context
    # longer than the tiny model's 4096 positions.
    prompt, response = int(overrides["data.max_prompt_length"]), int(overrides["data.max_response_length"])
    assert prompt + response <= int(overrides[f"{rollout}.max_model_len"]) <= int(
        overrides[f"{rollout}.max_num_batched_tokens"]) <= 4096
    # What the real run runs stays karl_kvg's: attention auto, FSDP2, offload, fused kernels, CUDA graphs,
    # sleep mode, chunked prefill off, and none of the CPU recipes' keys.
    for key in overrides:
        assert not key.startswith(("karl.runtime", "actor_rollout_ref.model.", "hydra.callbacks", "ray_kwargs")), key
        assert not any(word in key for word in ("strategy", "offload", "enforce_eager", "free_cache_engine",
                                                "enable_sleep_mode", "enable_chunked_prefill", "custom_cls",
                                                "rollout.dtype")), key


def test_cpu_runs_get_the_same_overrides_as_before(tmp_path):
    """No CUDA, no change: the CPU dry run's main_ppo command line is what it always was."""
    overrides = run_overrides(DryRunOptions(workdir=tmp_path), tmp_path)
    assert overrides == [
        f"data.train_files={tmp_path}/data/grounding.parquet", f"data.val_files={tmp_path}/data/grounding.parquet",
        f"actor_rollout_ref.model.path={tmp_path}/tiny-qwen3-vl", f"trainer.default_local_dir={tmp_path}/checkpoints",
        f"karl.mastery.probe_data={tmp_path}/data/probe.parquet", "karl.mastery.probe_images_per_entity=3",
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4", "trainer.total_epochs=2",
        "trainer.save_freq=2", "trainer.test_freq=4", "trainer.val_before_train=false",
        "actor_rollout_ref.rollout.seed=0", "karl.mastery.seed=0", f"hydra.run.dir={tmp_path}/hydra/run1",
        "hydra.output_subdir=null"]


def test_gpu_training_overrides_are_the_dry_runs_plus_the_gpu_sizes_then_the_users(tmp_path):
    options = gpu_options(tmp_path, gpus=2, extra_overrides=("trainer.total_epochs=3",))
    overrides = run_overrides(options, tmp_path)
    cpu = run_overrides(DryRunOptions(workdir=tmp_path), tmp_path)
    assert overrides == [*cpu, *gpu_overrides(2), "trainer.total_epochs=3"]


# --- the device ----------------------------------------------------------------------------------------------


@pytest.fixture()
def machine(monkeypatch):
    """A machine with ``gpus`` CUDA GPUs and vLLM importing (``vllm``: (usable, detail)); counts vLLM imports."""
    state = types.SimpleNamespace(gpus=0, vllm=(True, "0.24.0"), vllm_checks=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state.gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state.gpus)

    def vllm_status():
        state.vllm_checks += 1
        return state.vllm

    monkeypatch.setattr(gpu, "vllm_status", vllm_status)
    return state


def test_auto_without_cuda_is_the_cpu_run_and_never_imports_vllm(machine):
    choice = choose_device("auto")
    assert (choice.device, choice.fallback) == ("cpu", False)
    assert choose_device("cpu").device == "cpu"
    with pytest.raises(GpuOptionError, match="--device cuda: no CUDA GPU visible"):
        choose_device("cuda")
    assert machine.vllm_checks == 0


def test_auto_with_cuda_and_vllm_is_the_gpu_smoke_test(machine):
    machine.gpus = 4
    choice = choose_device("auto")
    assert (choice.device, choice.vllm_version) == ("cuda", "0.24.0")
    assert "4 CUDA GPU(s)" in choice.reason
    assert choose_device("cuda").device == "cuda"
    assert choose_device("cpu").device == "cpu"


def test_auto_with_cuda_but_no_vllm_falls_back_to_cpu_and_says_why(machine):
    machine.gpus, machine.vllm = 1, (False, "vllm does not import: ModuleNotFoundError: No module named 'vllm'")
    choice = choose_device("auto")
    assert (choice.device, choice.fallback) == ("cpu", True)
    assert "No module named 'vllm'" in choice.reason and 'pip install ".[gpu]"' in choice.reason
    with pytest.raises(GpuOptionError, match="No module named 'vllm'"):
        choose_device("cuda")


def test_cpu_only_options_keep_auto_on_cpu_and_refuse_cuda(machine):
    machine.gpus = 2
    choice = choose_device("auto", cpu_only="--stages 1,2")
    assert (choice.device, choice.fallback) == ("cpu", True)
    with pytest.raises(GpuOptionError, match="--stages 1,2 is for the CPU run only"):
        choose_device("cuda", cpu_only="--stages 1,2")
    assert machine.vllm_checks == 0


@pytest.mark.parametrize(("requested", "visible", "expected"), [
    (None, 1, 1), (None, 2, 2), (None, 3, 2), (None, 8, 2), (4, 8, 4), (1, 8, 1)])
def test_gpu_count(requested, visible, expected):
    assert choose_gpus(requested, visible) == expected


@pytest.mark.parametrize(("requested", "visible", "message"), [
    (None, 0, "no CUDA GPU"), (3, 8, "expected one of 1, 2, 4, 8"), (2, 1, "only 1 CUDA GPU")])
def test_gpu_count_refused(requested, visible, message):
    with pytest.raises(GpuOptionError, match=message):
        choose_gpus(requested, visible)


def test_vllm_status_imports_vllm_and_refuses_a_cpu_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.24.0"))
    assert gpu.vllm_status() == (True, "0.24.0")
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.24.0+cpu"))
    usable, detail = gpu.vllm_status()
    assert not usable and "CPU build" in detail
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    usable, detail = gpu.vllm_status()
    assert not usable and detail.startswith("vllm does not import: ")


def test_vllm_status_takes_back_what_import_vllm_sets_in_the_environment(tmp_path, monkeypatch):
    """The main_ppo child must start from the user's environment, not from one vLLM's import changed."""
    package = tmp_path / "vllm"
    package.mkdir()
    (package / "__init__.py").write_text("import os\nos.environ['KARL_TEST_SET_BY_VLLM'] = '1'\n"
                                         "os.environ.pop('KARL_TEST_KEPT', None)\n__version__ = '0.24.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Set, then deleted: undone in reverse, the fake leaves sys.modules as it found it (an import of the
    # fake left behind would make later tests in this process believe vLLM is installed).
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.delitem(sys.modules, "vllm")
    monkeypatch.setenv("KARL_TEST_KEPT", "yes")
    assert gpu.vllm_status() == (True, "0.24.0")
    assert "KARL_TEST_SET_BY_VLLM" not in os.environ and os.environ["KARL_TEST_KEPT"] == "yes"


# --- the environment -----------------------------------------------------------------------------------------


def test_the_gpu_child_loses_every_cpu_layer_variable():
    from karl_verl.cpu import environment

    cpu_shell = {**environment({"VERL_USE_EXTERNAL_MODULES": "my.plugin"}), "HOME": "/home/me"}
    assert set(CPU_LAYER_VARIABLES) <= set(cpu_shell)  # the list above is the CPU layer's
    env, unset = gpu_training_environment(cpu_shell)
    assert set(CPU_LAYER_VARIABLES) <= set(unset)
    assert env["VERL_USE_EXTERNAL_MODULES"] == "my.plugin"  # the user's own module stays, the CPU plugin goes
    assert env["VLLM_LOGGING_LEVEL"] == "INFO" and env["RAY_DEDUP_LOGS"] == "0"
    env, unset = gpu_training_environment({"VERL_USE_EXTERNAL_MODULES": "karl_verl.cpu.plugin",
                                           "VLLM_LOGGING_LEVEL": "DEBUG"})
    assert "VERL_USE_EXTERNAL_MODULES" in unset and "VERL_USE_EXTERNAL_MODULES" not in env
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_train_starts_the_gpu_child_without_the_cpu_layer_and_the_cpu_child_with_it(tmp_path, monkeypatch):
    """train() with a stand-in for run_main_ppo, then the real child launcher on a small Python child."""
    from karl_verl.cpu import environment
    from karl_verl.dryrun import pipeline
    from karl_verl.dryrun.launch import run_verl_child

    calls = []
    monkeypatch.setattr(pipeline, "run_main_ppo", lambda recipe, overrides, **kwargs: calls.append(
        (recipe, kwargs)) or RunResult(0, 0.0, kwargs["metrics_path"], kwargs["log_path"]))
    pipeline.train(gpu_options(tmp_path, progress=False), paths_under(tmp_path), "run1", [], 4)
    pipeline.train(DryRunOptions(workdir=tmp_path, progress=False), paths_under(tmp_path), "run1", [], 4)
    (gpu_recipe, gpu_call), (cpu_recipe, cpu_call) = calls
    assert (gpu_recipe, cpu_recipe) == ("karl_kvg", "karl_kvg_cpu")
    assert set(CPU_LAYER_VARIABLES) <= set(gpu_call["unset_env"]) and "KARL_VERL_CPU" not in gpu_call["env"]
    assert cpu_call["unset_env"] == () and cpu_call["env"]["KARL_VERL_CPU"] == "1"

    # A parent shell with the CPU layer on (its variables here in env, not in this process: set here, they
    # would turn the CPU layer on in this test process at its next import of verl).
    dump = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    result = run_verl_child([sys.executable, "-c", dump, str(tmp_path / "env.json")], metrics_path=tmp_path / "m.jsonl",
                            log_path=tmp_path / "child.log", env={**environment(), **gpu_call["env"]},
                            unset_env=gpu_call["unset_env"], timeout_s=60)
    assert result.ok, result.log_tail()
    child = json.loads((tmp_path / "env.json").read_text())
    assert [key for key in CPU_LAYER_VARIABLES if key in child] == []
    assert child["VLLM_LOGGING_LEVEL"] == "INFO" and "VERL_FILE_LOGGER_PATH" in child


# --- the log and the verdict ---------------------------------------------------------------------------------


def test_the_attention_line_the_resolver_prints_is_the_one_read_back(capsys):
    from karl_verl.integration.resolvers import announced_attention

    announced_attention.cache_clear()
    try:
        choice = announced_attention("sdpa")
    finally:
        announced_attention.cache_clear()
    printed = capsys.readouterr().err
    assert ATTENTION_LOG_PREFIX in printed
    evidence = read_log_evidence(f"(TaskRunnerV1 pid=12) {printed}")
    assert evidence.attention == choice.describe() and evidence.attention_implementation == "sdpa"


def test_log_evidence_of_vllm():
    log = ("(vLLMHttpServer pid=77) INFO 01-01 12:00:00 [core.py:115] Initializing a V1 LLM engine (v0.24.0) with "
           "config: model='/w/tiny-qwen3-vl'\n")
    assert read_log_evidence(log) == LogEvidence(attention=None, vllm_version="0.24.0", vllm_server=True)
    assert read_log_evidence("(vLLMHttpServer pid=77) WARNING something\n").vllm_served
    assert not read_log_evidence("(TaskRunnerV1 pid=3) step 1\n").vllm_served


def _setup(gpus: int = 1) -> GpuSetup:
    return GpuSetup(gpus=gpus, vllm_version="0.24.0", nccl_version="2.27.3",
                    attention=AttentionChoice("flash_attention_2", True, "karl.runtime.attention=auto: flash-attn"))


def _run(tmp_path: Path, name: str, steps: list[int], returncode: int = 0, log: str = "",
         timed_out: bool = False) -> RunResult:
    log_path = tmp_path / f"{name}.log"
    log_path.write_text(log)
    return RunResult(returncode, 10.0, tmp_path / f"{name}.jsonl", log_path, timed_out=timed_out,
                     steps=[{"step": step, "data": {}} for step in steps])


def test_verdict_passed(tmp_path):
    report = DryRunReport(recipe="karl_kvg", device="cuda", gpu=_setup(2),
                          stage_seconds={"data": 2.0, "model": 10.0, "train": 150.0, "resume": 50.0})
    report.runs = {"run1": _run(tmp_path, "run1", [1, 2, 3, 4]), "run2": _run(tmp_path, "run2", [5])}
    report.gpu_log = LogEvidence(attention="attn_implementation=flash_attention_2, use_remove_padding=true (x)",
                                 vllm_version="0.24.0")
    assert gpu_verdict(report) == ("GPU smoke test PASSED: 4 steps + 1 after resume on 2 GPUs (vLLM 0.24.0, "
                                   "flash_attention_2, NCCL 2.27.3) in 212 s")
    data = report.to_json()
    assert data["device"] == "cuda" and data["verdict"] == gpu_verdict(report) and data["gpu"]["gpus"] == 2
    assert data["log"]["vllm_served"] is True


OOM_LOG = """\
(WorkerDict pid=4242) Traceback (most recent call last):
(WorkerDict pid=4242)   File "vllm/v1/worker/gpu_worker.py", line 200, in determine_available_memory
ray.exceptions.RayTaskError(ValueError): ray::vLLMHttpServer.launch_server() (pid=4242)
ValueError: Free memory on device (3.1/79.1 GiB) on startup is less than desired GPU memory utilization (0.3, 23.7 GiB).
Error executing job with overrides: ['data.train_files=/w/data/grounding.parquet']
"""


def test_verdict_failed_at_train_names_the_error_and_what_to_do(tmp_path):
    report = DryRunReport(recipe="karl_kvg", device="cuda", gpu=_setup())
    report.runs = {"run1": _run(tmp_path, "run1", [], returncode=1, log=OOM_LOG)}
    report.problems.append("main_ppo run 1 failed (rc 1); last lines of ...")
    report.failed_stage = "train"
    verdict = gpu_verdict(report)
    assert verdict.startswith("GPU smoke test FAILED at train: main_ppo failed (rc 1): ValueError: Free memory on "
                              "device")
    assert "lower --gpu-memory-utilization" in verdict and f"(log: {tmp_path}/run1.log)" in verdict
    assert "\n" not in verdict and verdict.endswith("(see docs/gpu_smoke_test.md)")


def test_verdict_failed_at_resume_and_on_timeout(tmp_path):
    report = DryRunReport(recipe="karl_kvg", device="cuda", gpu=_setup())
    report.runs = {"run1": _run(tmp_path, "run1", [1, 2, 3, 4]),
                   "run2": _run(tmp_path, "run2", [], returncode=-9, timed_out=True,
                                log="NCCL WARN Connect to 10.0.0.2 failed\n")}
    report.problems.append("main_ppo run 2 (resume) failed")
    report.failed_stage = "resume"
    verdict = gpu_verdict(report)
    assert verdict.startswith("GPU smoke test FAILED at resume: main_ppo timed out: NCCL WARN Connect")
    assert "try --gpus 1" in verdict


def test_a_stage_that_raises_is_the_stage_the_verdict_names(tmp_path):
    from karl_verl.dryrun.pipeline import _stage

    report = DryRunReport(recipe="karl_kvg", device="cuda", gpu=_setup())
    with _stage(report, "data", say=lambda _: None):
        pass
    with pytest.raises(RuntimeError), _stage(report, "model", say=lambda _: None):
        raise RuntimeError("the tokenizer could not be built")
    report.problems.append("RuntimeError: the tokenizer could not be built")
    assert report.failed_stage == "model" and set(report.stage_seconds) == {"data", "model"}
    assert gpu_verdict(report) == ("GPU smoke test FAILED at model: RuntimeError: the tokenizer could not be built "
                                   "(see docs/gpu_smoke_test.md)")


def test_the_cpu_report_has_no_gpu_part():
    report = DryRunReport()
    assert "device" not in report.to_json() and "verdict" not in report.to_json()
    assert report.format().splitlines()[1] == ("karl-verl dry run: verl's main_ppo with the karl trainer on CPU "
                                               "(recipe karl_kvg_cpu, tiny Qwen3-VL warmed up on the answer format)")


# --- the command line ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from karl_verl.commands import dryrun

    parser = argparse.ArgumentParser()
    dryrun.add_arguments(parser)
    return parser


def test_the_command_line_parses_the_gpu_options(tmp_path):
    from karl_verl.commands import dryrun

    args = _parser().parse_args(["--device", "cuda", "--gpus", "2", "--gpu-memory-utilization", "0.2"])
    options = dryrun.dryrun_options(args, tmp_path, device="cuda", gpus=2)
    assert (options.recipe, options.rollout, options.device, options.gpus) == ("karl_kvg", "vllm", "cuda", 2)
    assert options.gpu_memory_utilization == 0.2 and options.extra_overrides == ()
    defaults = _parser().parse_args([])
    assert (defaults.device, defaults.gpus, defaults.gpu_memory_utilization) == ("auto", None, 0.3)
    cpu = dryrun.dryrun_options(defaults, tmp_path)
    assert (cpu.recipe, cpu.rollout, cpu.device) == ("karl_kvg_cpu", "transformers", "cpu")
    with pytest.raises(SystemExit):
        _parser().parse_args(["--device", "tpu"])


def test_help_explains_the_gpu_smoke_test():
    from karl_verl.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = subparsers.choices["dryrun"].format_help()
    for words in ("--device", "--gpus", "--gpu-memory-utilization", "GPU smoke test PASSED", "FAILED at <stage>",
                  "docs/gpu_smoke_test.md", "karl.runtime.attention=auto"):
        assert words in text, words
    assert (Path(__file__).resolve().parents[2] / "docs" / "gpu_smoke_test.md").is_file()


@pytest.mark.parametrize(("argv", "gpus", "message"), [
    (["--device", "cuda"], 0, "--device cuda: no CUDA GPU visible"),
    (["--device", "cuda", "--stages", "1,2"], 2, "--stages 1,2 is for the CPU run only"),
    (["--device", "cuda", "--rollout", "transformers"], 2, "--rollout transformers is for the CPU run only"),
    (["--device", "cuda", "--gpus", "3"], 4, "--gpus 3: expected one of"),
    (["--device", "cuda", "--gpus", "2"], 1, "--gpus 2: only 1 CUDA GPU"),
    (["--gpu-memory-utilization", "1.5"], 1, "--gpu-memory-utilization 1.5: expected a fraction")])
def test_the_command_refuses_what_cannot_run_before_doing_anything(tmp_path, machine, capsys, argv, gpus, message):
    from karl_verl.commands import dryrun

    machine.gpus = gpus
    workdir = tmp_path / "run"
    assert dryrun.run(_parser().parse_args([*argv, "--workdir", str(workdir)])) == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_the_command_prints_the_verdict_last_and_the_failed_stage(tmp_path, machine, capsys, monkeypatch):
    """The GPU path of the command with a stand-in for the dry run: one that passes, one whose model stage raises."""
    from karl_verl.commands import dryrun
    from karl_verl.dryrun import pipeline

    machine.gpus = 1
    seen = []

    def passing(options, say=print, report=None):
        seen.append(options)
        report.stage_seconds.update({"train": 100.0, "resume": 20.0})
        report.runs = {"run1": _run(tmp_path, "run1", [1, 2, 3, 4]), "run2": _run(tmp_path, "run2", [5])}
        report.outputs["workdir"] = str(options.workdir)
        return report

    monkeypatch.setattr(pipeline, "run_dryrun", passing)
    assert dryrun.run(_parser().parse_args(["--workdir", str(tmp_path / "ok"), "--no-progress"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("GPU smoke test PASSED: 4 steps + 1 after resume on 1 GPU (vLLM 0.24.0, ")
    assert (seen[0].device, seen[0].recipe, seen[0].gpus) == ("cuda", "karl_kvg", 1)
    saved = json.loads((tmp_path / "ok" / "dryrun_report.json").read_text())
    assert saved["verdict"] == lines[-1] and saved["ok"]

    def raising(options, say=print, report=None):
        with pipeline._stage(report, "model", say):
            raise OSError("disk full")

    monkeypatch.setattr(pipeline, "run_dryrun", raising)
    assert dryrun.run(_parser().parse_args(["--workdir", str(tmp_path / "bad"), "--no-progress"])) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == ("GPU smoke test FAILED at model: OSError: disk full "
                                                     "(see docs/gpu_smoke_test.md)")
    assert "Traceback" in captured.err  # the whole error for the user, the verdict still last on stdout
    assert json.loads((tmp_path / "bad" / "dryrun_report.json").read_text())["failed_stage"] == "model"


# --- the composed run: verl's config, verl's validation, karl-verl's pre-flight, on the paths written ---------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The GPU mode's stages 1-2 (data, model with vLLM's head width, a 2-step warm-up) and its run 1 overrides."""
    from karl_verl.dryrun.pipeline import prepare_inputs

    workdir = tmp_path_factory.mktemp("gpu-mode")
    options = gpu_options(workdir, gpus=2, warmup_steps=2, progress=False)
    report = DryRunReport(recipe=GPU_RECIPE, device="cuda")
    paths = prepare_inputs(options, report, say=lambda _: None)
    overrides = training_overrides(options, paths, checkpoints=workdir / "checkpoints",
                                   hydra_dir=workdir / "hydra" / "run1", total_epochs=options.epochs)
    return types.SimpleNamespace(workdir=workdir, options=options, paths=paths, overrides=overrides, report=report)


@pytest.mark.slow
def test_the_paths_the_overrides_name_exist_and_the_model_fits_vllm(prepared):
    overrides = as_dict(prepared.overrides)
    for key in ("data.train_files", "data.val_files", "karl.mastery.probe_data", "actor_rollout_ref.model.path"):
        assert Path(overrides[key]).exists(), key
    assert Path(overrides["trainer.default_local_dir"]).parent == prepared.workdir  # made by main_ppo
    config = json.loads((prepared.paths["model"] / "config.json").read_text())
    text = config["text_config"]
    assert text["head_dim"] >= 32 and text["head_dim"] % 8 == 0  # vLLM's attention kernels
    assert text["max_position_embeddings"] >= MAX_MODEL_LEN
    assert prepared.report.warmup_loss is not None


@pytest.mark.slow
def test_main_ppo_composes_the_gpu_run(prepared, tmp_path):
    """``main_ppo +recipe=karl_kvg <the overrides> --cfg job``: Hydra's own parsing of every override."""
    result = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", f"+recipe={GPU_RECIPE}",
                             *prepared.overrides, "--cfg", "job"], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    rollout = config["actor_rollout_ref"]["rollout"]
    assert config["trainer"]["device"] == "cuda" and config["trainer"]["n_gpus_per_node"] == 2
    assert config["trainer"]["logger"] == ["console", "file"]
    assert rollout["name"] == "vllm" and rollout["gpu_memory_utilization"] == 0.3
    assert rollout["enable_chunked_prefill"] is False and rollout["enforce_eager"] is False
    assert rollout["max_model_len"] == rollout["max_num_batched_tokens"] == MAX_MODEL_LEN
    assert config["karl"]["runtime"]["attention"] == "auto"
    assert "custom_cls" not in config["data"] or not (config["data"]["custom_cls"] or {}).get("path")
    model = config["actor_rollout_ref"]["model"]
    assert model["use_fused_kernels"] is True and model["path"] == str(prepared.paths["model"])
    assert config["actor_rollout_ref"]["actor"]["strategy"] == "fsdp2"
    assert config["actor_rollout_ref"]["actor"]["fsdp_config"]["optimizer_offload"] is True


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [*GPU_COUNTS, 3])
def test_verl_validates_the_gpu_run_for_every_gpu_count(prepared, gpus):
    """verl's own check of main_ppo (validate_config, in the driver before Ray starts) and its rollout config."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from karl_verl.dryrun.pipeline import compose_recipe

    options = gpu_options(prepared.workdir, gpus=gpus)
    config = compose_recipe(GPU_RECIPE, training_overrides(options, prepared.paths, checkpoints=prepared.workdir / "c",
                                                           hydra_dir=prepared.workdir / "h", total_epochs=2))

    def validate():
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        omega_conf_to_dataclass(config.actor_rollout_ref.rollout)

    if gpus in GPU_COUNTS:
        validate()
        assert need_reference_policy(config)  # KL loss: the reference runs too
    else:  # the reason GPU_COUNTS is what it is
        with pytest.raises(AssertionError, match="must be divisible"):
            validate()


@pytest.mark.slow
def test_the_preflight_accepts_the_gpu_run_apart_from_the_gpu_count(prepared):
    from karl_verl.dryrun.pipeline import compose_recipe
    from karl_verl.dryrun.preflight import run_preflight
    from karl_verl.integration.preflight import run_problems

    # karl-verl dryrun's pre-flight of a real run: keys, data rows, prompt lengths after image expansion, karl.*.
    report = run_preflight(GPU_RECIPE, prepared.overrides)
    assert [str(p) for p in report.problems] == [] and report.rows_checked > 0
    # main_ppo's stop-before-Ray callback: paths, karl.*, vLLM batch, wandb, GPU count (2 asked for).
    config = compose_recipe(GPU_RECIPE, prepared.overrides)
    assert run_problems(config, REQUIRED, environ={}, count_gpus=lambda: 2) == ([], [])
    unset, problems = run_problems(config, REQUIRED, environ={}, count_gpus=lambda: 0)
    assert unset == [] and len(problems) == 1 and problems[0].startswith("trainer.n_gpus_per_node: 2 GPUs asked for")
