"""verl platform ``cpu`` (karl_verl/cpu/platform.py): registration in a fresh process, the device module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from karl_verl.cpu import environment

PLATFORM_FACTS = """
import json
from verl.plugin.platform.platform_manager import PlatformRegistry, get_platform
from verl.utils.device import get_device_name, get_torch_device
from verl.workers.rollout.replica import RolloutReplicaRegistry
from karl_verl.cpu.platform import DEVICE_MODULE, CpuPlatform
platform = get_platform()
print(json.dumps({
    "registered": PlatformRegistry.get("cpu") is CpuPlatform,
    "platform": type(platform).__name__,
    "device_name": platform.device_name,
    "verl_device_name": get_device_name(),
    "device_module_is_ours": get_torch_device() is DEVICE_MODULE,
    "current_device": platform.current_device(),
    "comm": platform.communication_backend_name(),
    "ray_resource": platform.ray_resource_name(),
    "rollout_registered": RolloutReplicaRegistry.get("transformers") is not None,
}))
"""

ACTIVATE_AFTER_MAIN_PPO = """
import json, os
import verl.trainer.main_ppo
from verl.plugin.platform.platform_manager import get_platform
before = type(get_platform()).__name__
import karl_verl.cpu
karl_verl.cpu.activate()
after = get_platform()
print(json.dumps({"before": before, "after": type(after).__name__, "device": after.device_name,
                  "env": os.environ["VERL_PLATFORM"]}))
"""


def _without_cpu_layer() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KARL_VERL_CPU", "VERL_PLATFORM", "VERL_ENGINE_DEVICE", "VERL_USE_EXTERNAL_MODULES")
    }
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


@pytest.fixture(scope="module")
def fresh_interpreters():
    """Programs run each in a new interpreter, all started at once (importing verl takes seconds each);
    ``result(name)`` is the JSON object on the last line of that program's stdout."""
    cpu_env = _without_cpu_layer()
    cpu_env.update(environment(cpu_env))
    programs = {
        # A verl process of a CPU run: verl's own import loads the plugin (VERL_USE_EXTERNAL_MODULES).
        "verl first": ("import verl\nimport karl_verl.cpu.plugin\n" + PLATFORM_FACTS, cpu_env),
        # A Ray worker whose first import is the rollout server's class (unpickling the actor).
        "rollout first": ("import karl_verl.cpu.rollout\nimport karl_verl.cpu.plugin\n" + PLATFORM_FACTS, cpu_env),
        # The Hydra callback: main_ppo's import already resolved a platform, without the CPU layer.
        "activate": (ACTIVATE_AFTER_MAIN_PPO, _without_cpu_layer()),
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (code, env) in programs.items()
    }

    def result(name: str) -> dict:
        stdout, stderr = processes[name].communicate(timeout=180)
        assert processes[name].returncode == 0, stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1])

    yield result
    for process in processes.values():
        process.kill()
        process.communicate()


@pytest.mark.parametrize("first_import", ["verl first", "rollout first"])
def test_plugin_registers_cpu_platform_and_verl_resolves_it(fresh_interpreters, first_import):
    assert fresh_interpreters(first_import) == {
        "registered": True,
        "platform": "CpuPlatform",
        "device_name": "cpu",
        "verl_device_name": "cpu",
        "device_module_is_ours": True,
        "current_device": "cpu",
        "comm": "gloo",
        "ray_resource": "GPU",
        "rollout_registered": True,
    }


def test_activate_replaces_a_platform_main_ppo_already_resolved(fresh_interpreters):
    facts = fresh_interpreters("activate")
    assert facts["before"] != "CpuPlatform"
    assert facts == {"before": facts["before"], "after": "CpuPlatform", "device": "cpu", "env": "cpu"}


def test_environment_adds_the_plugin_once_to_existing_external_modules():
    env = environment({"VERL_USE_EXTERNAL_MODULES": "some.module"})
    assert env["VERL_USE_EXTERNAL_MODULES"] == "some.module,karl_verl.cpu.plugin"
    again = environment({"VERL_USE_EXTERNAL_MODULES": env["VERL_USE_EXTERNAL_MODULES"]})
    assert again["VERL_USE_EXTERNAL_MODULES"] == "some.module,karl_verl.cpu.plugin"
    assert env["VERL_PLATFORM"] == "cpu" and env["KARL_VERL_CPU"] == "1"


def test_environment_sets_vllm_cpus_variables_unless_the_user_did():
    env = environment({})
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_MLA_DISABLE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # GiB; vLLM would size it from gpu_memory_utilization x RAM
    assert environment({"VLLM_CPU_KVCACHE_SPACE": "4"})["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_memory_figures_are_plausible_host_numbers():
    from karl_verl.cpu.platform import DEVICE_MODULE

    free, total = DEVICE_MODULE.mem_get_info()
    assert 0 < free <= total
    assert total == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    allocated = DEVICE_MODULE.memory_allocated()
    assert 0 < allocated <= total
    # Peak resident memory is at least what is resident now (both read from the kernel).
    assert DEVICE_MODULE.max_memory_allocated() >= allocated
    assert DEVICE_MODULE.memory_reserved() > 0 and DEVICE_MODULE.max_memory_reserved() > 0


def test_rng_state_round_trip_reproduces_torch_rand():
    from karl_verl.cpu.platform import DEVICE_MODULE

    state = DEVICE_MODULE.get_rng_state()
    first = torch.rand(8)
    assert not torch.equal(first, torch.rand(8))
    DEVICE_MODULE.set_rng_state(state)
    assert torch.equal(torch.rand(8), first)
    DEVICE_MODULE.manual_seed(123)
    seeded = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), seeded)


def test_release_calls_do_nothing_and_torch_cpu_fills_the_rest():
    from karl_verl.cpu.platform import DEVICE_MODULE

    assert DEVICE_MODULE.empty_cache() is None and DEVICE_MODULE.ipc_collect() is None
    assert DEVICE_MODULE.get_device_name() == "CPU" and DEVICE_MODULE.is_available()
    assert DEVICE_MODULE.synchronize is torch.cpu.synchronize


def test_unknown_attribute_raises_attribute_error_naming_it():
    from karl_verl.cpu.platform import DEVICE_MODULE

    with pytest.raises(AttributeError, match="'no_such_cuda_call'"):
        DEVICE_MODULE.no_such_cuda_call  # noqa: B018
    assert not hasattr(DEVICE_MODULE, "no_such_cuda_call")


def test_platform_is_only_available_when_selected(monkeypatch):
    from karl_verl.cpu.platform import CpuPlatform

    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    assert not CpuPlatform().is_platform_available(use_smi_check=True)  # never auto-detected
    monkeypatch.setenv("VERL_PLATFORM", " CPU ")
    assert CpuPlatform().is_platform_available()
