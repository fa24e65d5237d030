"""verl's device layer on a machine without an accelerator: a ``cpu`` platform for verl 0.9.

verl 0.9.1 resolves one platform per process (``verl/plugin/platform/platform_manager.py``); with no
accelerator it falls back to ``nvidia`` and every engine asks for CUDA devices. :class:`CpuPlatform`
is registered with verl's own ``PlatformRegistry`` under ``cpu`` and selected by
``VERL_PLATFORM=cpu``, which :func:`karl_verl.cpu.activate` sets. What it maps:

* device ``cpu``, collective backend ``gloo``; tensors stay in host memory;
* Ray resources: the platform asks Ray for ``GPU`` resources, which on a CPU machine are *logical*
  GPUs declared at ``ray.init`` (``ray_kwargs.ray_init.num_gpus``): one per FSDP rank, so verl's
  resource pools and placement groups work unchanged;
* :data:`DEVICE_MODULE` stands in for ``torch.cuda`` where verl calls ``get_torch_device()``:
  memory figures are the process's host memory (so verl's memory logs stay meaningful), caches and
  IPC have nothing to release, RNG state is torch's CPU generator.

Runs in every verl process of a CPU run (driver, TaskRunner, FSDP workers, agent-loop and reward
workers, the rollout server); never imported on a GPU run.
"""

from __future__ import annotations

import contextlib
import os
import resource
import types
from collections.abc import Iterator
from typing import Any

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

PLATFORM_NAME = "cpu"


def _rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _host_memory() -> tuple[int, int]:
    """(available, total) host memory in bytes, what ``torch.cuda.mem_get_info`` reports for a GPU."""
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def _nothing(*args: Any, **kwargs: Any) -> None:
    """Host memory has no allocator cache or IPC handles to release, and no memory fraction to set."""
    return None


class _CpuDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the ``torch.cuda`` functions verl 0.9.1 calls on ``get_torch_device()``."""

    def __init__(self) -> None:
        super().__init__("karl_verl.cpu.device")
        self.empty_cache = _nothing
        self.ipc_collect = _nothing
        self.set_per_process_memory_fraction = _nothing
        self.reset_peak_memory_stats = _nothing
        self.mem_get_info = lambda *args, **kwargs: _host_memory()
        self.memory_allocated = lambda *args, **kwargs: _rss_bytes()
        self.memory_reserved = lambda *args, **kwargs: _rss_bytes()
        self.max_memory_allocated = lambda *args, **kwargs: _peak_rss_bytes()
        self.max_memory_reserved = lambda *args, **kwargs: _peak_rss_bytes()
        self.memory_stats = lambda *args, **kwargs: {}
        self.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        self.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
        self.manual_seed = torch.manual_seed
        self.manual_seed_all = torch.manual_seed
        # verl/utils/flops_counter.py maps the device name to peak FLOPS; only strings are accepted.
        self.get_device_name = lambda *args, **kwargs: "CPU"
        self.is_available = lambda: True
        self.device_count = lambda: 1

    def __getattr__(self, name: str) -> Any:
        # Streams, events, synchronize, current_device, set_device: torch.cpu has them.
        try:
            return getattr(torch.cpu, name)
        except AttributeError:
            raise AttributeError(f"karl-verl's CPU device module has no {name!r} (torch.cpu neither); "
                                 "a verl code path this CPU layer does not cover") from None


#: The device module of :class:`CpuPlatform` (stateless: one per process is harmless).
DEVICE_MODULE = _CpuDeviceModule()


class CpuPlatform(PlatformBase):
    """verl platform ``cpu``: FSDP2 over gloo in host memory, logical Ray GPUs as device slots."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a CPU run selects it explicitly (VERL_PLATFORM=cpu).
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

    def current_device(self) -> str:  # type: ignore[override]
        # verl passes get_device_id() straight to .to() and torch.device(); an int would mean
        # accelerator 0 (verl/utils/fsdp_utils.py:507 "Cannot access accelerator device").
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None  # one host memory: nothing to select

    def synchronize(self, device_index: int | None = None) -> None:
        return None  # CPU kernels run synchronously

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None  # expandable segments are a CUDA caching-allocator setting

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for actors holding logical GPUs; nothing reads it on CPU.
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> None:
        return None


def register() -> None:
    """Register :class:`CpuPlatform` as verl's platform ``cpu`` (idempotent)."""
    if PlatformRegistry.get(PLATFORM_NAME) is not CpuPlatform:
        PlatformRegistry.register(platform=PLATFORM_NAME)(CpuPlatform)


def is_registered() -> bool:
    return PlatformRegistry.get(PLATFORM_NAME) is CpuPlatform
