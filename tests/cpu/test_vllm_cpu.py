"""The vllm-cpu install's package facts (karl_verl/cpu/vllm_cpu.py), on a fake site-packages folder."""

import importlib.metadata

import pytest

from karl_verl.cpu import vllm_cpu


@pytest.fixture()
def versions(monkeypatch):
    """Installed distributions as this test says (name -> version), instead of the environment's."""
    installed = {"torch": "2.11.0+cu130", "torchvision": "0.26.0", "transformers": "5.9.0"}
    monkeypatch.setattr(vllm_cpu, "_version", installed.get)
    return installed


def test_without_vllm_cpu_the_status_says_how_to_install_it(versions):
    usable, detail = vllm_cpu.vllm_rollout_status()
    assert not usable and "vllm-cpu is not installed" in detail and "bootstrap.sh --vllm" in detail
    versions["vllm"] = "0.24.0"
    assert "is a GPU build" in vllm_cpu.vllm_rollout_status()[1]


def test_the_shim_answers_vllms_version_with_the_cpu_build(tmp_path, versions, monkeypatch):
    versions["vllm-cpu"] = "0.24.0"
    folder = vllm_cpu.write_distribution_shim(tmp_path)
    assert folder.name == "vllm-0.24.0+cpu.dist-info"
    assert "Name: vllm\nVersion: 0.24.0+cpu\n" in (folder / "METADATA").read_text()
    # importlib.metadata reads it as verl does.
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.metadata

    assert importlib.metadata.version("vllm") == "0.24.0+cpu"
    # Written again (a re-run, another version): one shim, the new one; nothing half-written is left.
    versions["vllm-cpu"] = "0.24.1"
    assert vllm_cpu.write_distribution_shim(tmp_path).name == "vllm-0.24.1+cpu.dist-info"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm-0.24.1+cpu.dist-info"]


def test_a_real_vllm_distribution_is_never_replaced(tmp_path, versions):
    versions["vllm-cpu"] = "0.24.0"
    real = tmp_path / "vllm-0.24.0.dist-info"
    real.mkdir()
    (real / "INSTALLER").write_text("pip\n")
    with pytest.raises(RuntimeError, match="is a real vllm distribution"):
        vllm_cpu.write_distribution_shim(tmp_path)
    assert (real / "INSTALLER").read_text() == "pip\n"


def test_each_missing_piece_is_named(tmp_path, versions, monkeypatch):
    monkeypatch.setattr(vllm_cpu, "_site_packages", lambda: tmp_path)
    monkeypatch.setattr(vllm_cpu.importlib.util, "find_spec", lambda name: object())
    versions.update({"vllm-cpu": "0.24.0", "torchaudio": "2.11.0", "transformers": "5.10.4"})
    usable, detail = vllm_cpu.vllm_rollout_status()
    assert not usable
    assert "distribution name 'vllm' (found: none)" in detail
    assert "torchaudio installed" in detail and "pip uninstall -y torchaudio" in detail
    assert "transformers 5.10.4: vllm-cpu 0.24.0 runs with transformers==5.9.0" in detail
    versions.update({"vllm": "0.24.0+cpu", "transformers": "5.9.0"})
    del versions["torchaudio"]
    assert vllm_cpu.vllm_rollout_status() == (True, "vllm-cpu 0.24.0 (verl sees vllm 0.24.0+cpu), torch 2.11.0+cu130")
    versions["vllm-cpu"] = "0.28.0"
    assert "karl-verl supports 0.24.0" in vllm_cpu.vllm_rollout_status()[1]
    versions.update({"vllm-cpu": "0.24.0", "torch": "2.13.0+cpu"})
    assert "torch 2.13.0+cpu: vllm-cpu 0.24.0 runs with torch==2.11.0" in vllm_cpu.vllm_rollout_status()[1]


def test_constraints_are_the_gpu_pins_and_requirements_leave_torch_to_the_bootstrap(monkeypatch):
    assert vllm_cpu.pip_constraints() == ["torch==2.11.0", "torchvision==0.26.0", "transformers==5.9.0"]
    # vllm-cpu 0.24.0's own Requires-Dist lines (its torch is a +cpu build the registry does not carry).
    requires = ['transformers>=5.5.3', 'numpy', 'fastapi[standard]>=0.115.0; python_version >= "3.9"',
                'torch==2.11.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"',
                'torchaudio; platform_machine != "s390x"', 'torchvision; platform_machine != "s390x"',
                'tensorizer==2.10.1; extra == "tensorizer"']
    monkeypatch.setattr(vllm_cpu.importlib.metadata, "requires", lambda name: requires)
    assert vllm_cpu.vllm_cpu_requirements() == [
        "transformers>=5.5.3", "numpy", 'fastapi[standard]>=0.115.0; python_version >= "3.9"']
    assert vllm_cpu.main(["constraints"]) == 0


def test_the_installed_vllm_cpu_stack_matches_what_the_environment_has():
    """In the vLLM environment (.venv-vllm) every pin holds; elsewhere this says what is missing."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed in this environment (scripts/bootstrap.sh --vllm builds .venv-vllm)")
    usable, detail = vllm_cpu.vllm_rollout_status()
    assert usable, detail
