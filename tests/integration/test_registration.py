"""Registration into verl: the ``verl.plugins`` entry point, ``import karl_verl``, idempotency."""

import os
import subprocess
import sys

import pytest

CHECK = """
import sys
import verl
from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
print("karl_verl imported:", "karl_verl" in sys.modules)
print("reward manager:", "karl" in REWARD_MANAGER)
print("estimator:", "karl_grpo" in ADV_ESTIMATOR_REGISTRY)
from verl.trainer.ppo.v1 import get_trainer_cls
try:
    print("trainer:", get_trainer_cls("karl").__name__ == "KarlTrainer")
except Exception as err:  # verl raises for an unknown trainer name
    print("trainer: False", type(err).__name__)
"""


def run_python(code: str, tmp_path, **env) -> str:
    # From an empty folder, so the installed package is what loads (not the source tree).
    environment = {**os.environ, **env}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_only_verl_registers_everything(tmp_path):
    out = run_python(CHECK, tmp_path, VERL_USE_EXTERNAL_PLUGINS="auto")
    assert "karl_verl imported: True" in out
    assert "reward manager: True" in out and "estimator: True" in out and "trainer: True" in out


def test_plugins_none_turns_it_off(tmp_path):
    out = run_python(CHECK, tmp_path, VERL_USE_EXTERNAL_PLUGINS="none")
    assert "karl_verl imported: False" in out
    assert "reward manager: False" in out and "estimator: False" in out and "trainer: False" in out


def test_registering_twice_is_harmless():
    import karl_verl  # noqa: F401
    from karl_verl.integration import register_all, registration_status

    register_all()
    register_all()
    assert all(registered for _, _, registered in registration_status())


@pytest.mark.parametrize(("policy", "expected_rc"), [("auto", 0), ("none", 1)])
def test_info_command(tmp_path, policy, expected_rc):
    environment = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": policy}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-m", "karl_verl", "info", "--no-recipes"], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == expected_rc, result.stdout + result.stderr[-2000:]
    for name in ("karl-verl", "verl", "torch", "transformers", "'karl'", "'karl_grpo'"):
        assert name in result.stdout
    assert "vLLM rollout on CPU (rollout.name=vllm, optional):" in result.stdout  # never decides the exit code


def test_importing_karl_verl_registers_once_verl_loads_and_not_before(tmp_path):
    """``import karl_verl`` registers even with verl's plugin loading off, without importing verl itself."""
    code = "import sys\nimport karl_verl\nimport karl_verl.reward\n" \
           "print('heavy before verl:', sorted(m for m in ('verl', 'torch', 'ray') if m in sys.modules))\n" + CHECK
    out = run_python(code, tmp_path, VERL_USE_EXTERNAL_PLUGINS="none")
    assert "heavy before verl: []" in out
    assert "reward manager: True" in out and "estimator: True" in out and "trainer: True" in out


def test_verl_keeps_its_own_loader(tmp_path):
    code = "import karl_verl, verl, importlib.machinery\n" \
           "print('loader:', type(verl.__spec__.loader).__name__, type(verl.__loader__).__name__)"
    assert "loader: SourceFileLoader SourceFileLoader" in run_python(code, tmp_path)


@pytest.mark.parametrize("policy", ["auto", "none"])
@pytest.mark.parametrize("part", ["trainer", "reward_manager", "estimator"])
def test_importing_one_part_first_registers_everything(tmp_path, policy, part):
    """A part's own import starts verl's, which registers the parts while that one is half-imported."""
    code = f"import karl_verl.integration.{part}\n" + CHECK
    out = run_python(code, tmp_path, VERL_USE_EXTERNAL_PLUGINS=policy)
    assert "reward manager: True" in out and "estimator: True" in out and "trainer: True" in out


def test_importing_verl_imports_no_part_and_no_registry_host(tmp_path):
    """verl loads the entry point in every process (vLLM and reward workers too): that must not import
    the trainer, the agent loop or TransferQueue's trainer side. Measured against the same import
    with verl's plugin loading off (3,118 modules on verl 0.9.1; 4,645 when the entry point imported
    every part)."""
    hosts = ("verl.trainer.ppo.v1", "verl.experimental.agent_loop", "verl.trainer.ppo.core_algos",
             "verl.experimental.reward_loop.reward_manager", "karl_verl.integration.trainer",
             "karl_verl.integration.inject_agent_loop")
    code = f"import sys\nimport verl\nprint(len(sys.modules), sorted(m for m in {hosts!r} if m in sys.modules))"
    with_plugin = run_python(code, tmp_path, VERL_USE_EXTERNAL_PLUGINS="auto").split(maxsplit=1)
    without = run_python(code, tmp_path, VERL_USE_EXTERNAL_PLUGINS="none").split(maxsplit=1)
    assert with_plugin[1].strip() == without[1].strip() == "[]"
    assert int(with_plugin[0]) - int(without[0]) <= 40, (with_plugin, without)
