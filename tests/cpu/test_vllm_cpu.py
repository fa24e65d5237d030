"""The vllm-cpu install's package facts (karl_verl/cpu/vllm_cpu.py), on a fake site-packages folder."""

import subprocess
import sys

import pytest

from karl_verl.cpu import vllm_cpu


@pytest.fixture()
def versions(monkeypatch):
    """Installed distributions as this test says (name -> version), instead of the environment's."""
    installed = {"torch": "2.13.0+cpu"}
    monkeypatch.setattr(vllm_cpu, "_version", installed.get)
    return installed


def test_without_vllm_cpu_the_status_says_how_to_install_it(versions):
    usable, detail = vllm_cpu.vllm_rollout_status()
    assert not usable and "vllm-cpu is not installed" in detail and "bootstrap.sh --vllm" in detail
    versions["vllm"] = "0.24.0"
    assert "is a GPU build" in vllm_cpu.vllm_rollout_status()[1]


def test_the_shim_answers_vllms_version_with_the_cpu_build(tmp_path, versions, monkeypatch):
    versions["vllm-cpu"] = "0.28.0"
    folder = vllm_cpu.write_distribution_shim(tmp_path)
    assert folder.name == "vllm-0.28.0+cpu.dist-info"
    assert "Name: vllm\nVersion: 0.28.0+cpu\n" in (folder / "METADATA").read_text()
    # importlib.metadata reads it as verl does.
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.metadata

    assert importlib.metadata.version("vllm") == "0.28.0+cpu"
    # Written again (a re-run, another version): one shim, the new one; nothing half-written is left.
    versions["vllm-cpu"] = "0.28.1"
    assert vllm_cpu.write_distribution_shim(tmp_path).name == "vllm-0.28.1+cpu.dist-info"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm-0.28.1+cpu.dist-info"]


def test_a_real_vllm_distribution_is_never_replaced(tmp_path, versions):
    versions["vllm-cpu"] = "0.28.0"
    real = tmp_path / "vllm-0.24.0.dist-info"
    real.mkdir()
    (real / "INSTALLER").write_text("pip\n")
    with pytest.raises(RuntimeError, match="is a real vllm distribution"):
        vllm_cpu.write_distribution_shim(tmp_path)
    assert (real / "INSTALLER").read_text() == "pip\n"


def test_each_missing_piece_is_named(tmp_path, versions, monkeypatch):
    monkeypatch.setattr(vllm_cpu, "_site_packages", lambda: tmp_path)
    monkeypatch.setattr(vllm_cpu.importlib.util, "find_spec", lambda name: object())
    versions.update({"vllm-cpu": "0.28.0", "torchvision": "0.28.0", "torchaudio": "2.11.1"})
    usable, detail = vllm_cpu.vllm_rollout_status()
    assert not usable
    assert "distribution name 'vllm' (found: none)" in detail
    assert "torchaudio installed" in detail and "pip uninstall -y torchaudio" in detail
    assert "op-schema hook" in detail
    versions["vllm"] = "0.28.0+cpu"
    del versions["torchaudio"]
    vllm_cpu.write_torchvision_hook(tmp_path)
    assert vllm_cpu.vllm_rollout_status() == (True, "vllm-cpu 0.28.0 (verl sees vllm 0.28.0+cpu), torch 2.13.0+cpu")
    versions["vllm-cpu"] = "0.32.0"
    assert "karl-verl supports 0.28.0" in vllm_cpu.vllm_rollout_status()[1]


def test_the_hook_runs_at_interpreter_start_without_importing_karl_verl_or_torch(tmp_path):
    vllm_cpu.write_torchvision_hook(tmp_path)
    code = ("import sys, site; site.addsitedir(sys.argv[1]); "
            "print(any(type(f).__name__ == 'TorchvisionOpsFinder' for f in sys.meta_path), "
            "'karl_verl' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False", "False"], out.stderr
