"""The GPU node's stack (karl_verl/gpu_stack.py): verl's pins, the installed versions, the actor's attention."""

import sys

import pytest

from karl_verl import gpu_stack
from karl_verl.cpu.vllm_cpu import VLLM_CPU_STACK


@pytest.fixture()
def flash_attn_site(tmp_path, monkeypatch):
    """A folder on sys.path where the test writes a ``flash_attn`` package; none is imported yet."""
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(body: str) -> None:
        (tmp_path / "flash_attn").mkdir(exist_ok=True)
        (tmp_path / "flash_attn" / "__init__.py").write_text(body)

    yield write
    sys.modules.pop("flash_attn", None)


def test_verl_pins_are_read_from_the_installed_verl():
    pins = gpu_stack.verl_extra_pins()
    assert {name: pins[name] for name in ("torch", "transformers", "vllm")} == {
        "torch": "2.11.0", "transformers": "5.9.0", "vllm": "0.24.0"}
    # flash-attn comes from the extra verl[fsdp] pulls in, not from verl[vllm] itself.
    assert pins["flash-attn"] == "2.8.3"
    assert gpu_stack.verl_extra_pins(distribution="no-such-distribution") == {}


def test_the_vllm_cpu_environment_pins_the_gpu_nodes_versions():
    pins = gpu_stack.verl_extra_pins()
    assert {name: VLLM_CPU_STACK[name] for name in ("torch", "torchvision", "transformers")} == {
        name: pins[name] for name in ("torch", "torchvision", "transformers")}
    assert VLLM_CPU_STACK["vllm-cpu"] == pins["vllm"]


def test_the_stack_report_compares_release_numbers_without_local_labels(monkeypatch):
    installed = {"torch": "2.11.0+cu130", "transformers": "5.10.4", "vllm": "0.24.0+cpu"}
    monkeypatch.setattr(gpu_stack, "_installed", installed.get)
    report = {c.name: c for c in gpu_stack.stack_report({"torch": "2.11.0", "transformers": "5.9.0",
                                                          "vllm": "0.24.0", "flash-attn": "2.8.3"})}
    assert report["torch"].matches and report["vllm"].matches
    assert not report["transformers"].matches
    assert "differs from verl's GPU pin 5.9.0" in report["transformers"].describe()
    assert not report["flash-attn"].matches and "not installed" in report["flash-attn"].describe()


def test_auto_uses_flash_attention_with_packed_sequences_where_flash_attn_imports(flash_attn_site):
    flash_attn_site('__version__ = "2.8.3"\n')
    choice = gpu_stack.choose_attention("auto")
    assert (choice.implementation, choice.remove_padding) == ("flash_attention_2", True)
    assert "flash-attn 2.8.3 imports" in choice.reason


def test_auto_falls_back_to_sdpa_without_packing_when_flash_attn_is_absent_or_broken(flash_attn_site, monkeypatch):
    absent = gpu_stack.choose_attention("auto")
    assert (absent.implementation, absent.remove_padding) == ("sdpa", False)
    assert "No module named 'flash_attn'" in absent.reason
    # Installed for another torch: present on disk, but its extension does not load.
    flash_attn_site('raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")\n')
    broken = gpu_stack.choose_attention("auto")
    assert (broken.implementation, broken.remove_padding) == ("sdpa", False)
    assert "undefined symbol" in broken.reason


def test_an_explicit_choice_is_kept_and_remove_padding_follows_it():
    assert gpu_stack.choose_attention("eager").remove_padding is False
    assert gpu_stack.choose_attention("flash_attention_2").remove_padding is True
    with pytest.raises(ValueError, match="karl.runtime.attention: expected one of"):
        gpu_stack.choose_attention("flash")
