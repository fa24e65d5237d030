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
    assert "reward manager: True" in out and "estimator: True" in out


def test_plugins_none_turns_it_off(tmp_path):
    out = run_python(CHECK, tmp_path, VERL_USE_EXTERNAL_PLUGINS="none")
    assert "karl_verl imported: False" in out
    assert "reward manager: False" in out and "estimator: False" in out


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
