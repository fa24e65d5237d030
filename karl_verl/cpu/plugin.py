"""Imported by ``import verl`` in every process of a CPU run (``VERL_USE_EXTERNAL_MODULES``); registers the layer.

Importing registers, as verl's own decorators do (registry entries and three replaced functions,
all idempotent); see :mod:`karl_verl.cpu`. The platform goes first: several verl modules resolve
the platform at import time (e.g. ``workers/engine/fsdp/transformer_impl.py`` asks for the
device name), and one resolved before ``cpu`` is registered fails.
"""

from __future__ import annotations

from karl_verl.cpu import platform as cpu_platform

cpu_platform.register()

from karl_verl.cpu import patches, rollout  # noqa: E402  (they import verl modules that resolve the platform)


def register() -> None:
    """Platform ``cpu``, rollout ``transformers``, and the patches of :mod:`karl_verl.cpu.patches`."""
    cpu_platform.register()
    # A process whose first import is the rollout module (Ray unpickling the server class) gets here
    # from inside that import; the module registers itself on its last line once it is complete.
    if not getattr(rollout.__spec__, "_initializing", False):
        rollout.register()
    patches.install_gloo_backend_fix()
    patches.install_processor_fix()
    patches.install_unpinned_offload_policy()
    patches.install_vllm_resyncable_linear_weights()  # only in processes that run vLLM


def registration_status() -> list[tuple[str, str, bool]]:
    return [("platform (verl.plugin.platform)", cpu_platform.PLATFORM_NAME, cpu_platform.is_registered()),
            ("rollout (verl.workers.rollout)", rollout.ROLLOUT_NAME, rollout.is_registered())]


register()
