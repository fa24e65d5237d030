"""The bounded wait of verl's weight sync into vLLM (karl_verl/integration/weight_sync.py), on verl's own sender.

The sender's module is loaded from its file: its package imports vLLM, which this environment lacks;
the module itself needs only torch, zmq and verl's device helpers. The whole path, with a vLLM whose
load fails, runs in tests/cpu/test_vllm_rollout.py.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

from karl_verl.integration import weight_sync


def _load_verls_weight_transfer(name: str) -> types.ModuleType:
    """verl's bucketed_weight_transfer.py loaded by file: its package imports vLLM, this file does not."""
    import verl

    path = Path(verl.__file__).parent / "workers" / "rollout" / "vllm_rollout" / "bucketed_weight_transfer.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weight_sync_without_an_answer_fails_within_the_timeout(monkeypatch):
    """verl's sender blocks in recv() forever when vLLM's receiver fails; patched, it raises in time."""
    import asyncio
    import time

    module = _load_verls_weight_transfer("_karl_test_weight_transfer")
    weight_sync.patch_sender(module)
    weight_sync.patch_sender(module)  # idempotent
    monkeypatch.setenv(weight_sync.WEIGHT_SYNC_TIMEOUT_ENV, "1")
    # What verl's device module answers in a CPU run (this test process has not switched platforms).
    monkeypatch.setattr(module, "get_torch_device", lambda: types.SimpleNamespace(
        synchronize=lambda: None, empty_cache=lambda: None, ipc_collect=lambda: None))
    monkeypatch.setattr(module, "is_support_ipc", lambda: False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = module.BucketedWeightSender(zmq_handle=f"tcp://127.0.0.1:{port}", bucket_size_mb=1, use_shm=True)
    weights = [("layer.weight", torch.ones(4, 4))]
    start = time.monotonic()
    with pytest.raises(weight_sync.WeightSyncTimeout, match=r"within 1 s \(KARL_WEIGHT_SYNC_TIMEOUT_S\)"):
        asyncio.run(sender.async_send_weights(iter(weights)))
    assert time.monotonic() - start < 10
    assert sender.socket is None and sender.shm is None  # verl's own cleanup ran: socket closed, bucket unlinked


@pytest.mark.parametrize("raw, expected", [("", weight_sync.WEIGHT_SYNC_TIMEOUT_S), ("2.5", 2.5)])
def test_weight_sync_timeout_from_the_environment(raw, expected):
    assert weight_sync.weight_sync_timeout_s({weight_sync.WEIGHT_SYNC_TIMEOUT_ENV: raw}) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "soon"])
def test_weight_sync_timeout_refuses_a_bad_value_naming_the_variable(raw):
    with pytest.raises(ValueError, match=f"KARL_WEIGHT_SYNC_TIMEOUT_S={raw!r}: expected a positive"):
        weight_sync.weight_sync_timeout_s({weight_sync.WEIGHT_SYNC_TIMEOUT_ENV: raw})


def test_after_import_patches_a_module_when_it_is_first_imported(tmp_path, monkeypatch):

    (tmp_path / "karl_late_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    weight_sync.after_import("karl_late_module", seen.append)
    weight_sync.after_import("karl_late_module", seen.append)  # one hook, not two
    assert not seen
    import karl_late_module  # noqa: F401

    assert [m.VALUE for m in seen] == [1]
    assert type(karl_late_module.__loader__).__name__ == "SourceFileLoader"  # the real loader handed back
    assert not any(isinstance(f, weight_sync._AfterImport) and f.name == "karl_late_module" for f in sys.meta_path)
    sys.modules.pop("karl_late_module", None)


def test_importing_karl_verl_arms_the_patch_for_when_verls_sender_is_imported():
    """In every process: a GPU run's actor gets the bounded wait as a CPU run's does."""
    import karl_verl  # noqa: F401

    assert any(isinstance(f, weight_sync._AfterImport) and f.name == weight_sync.WEIGHT_TRANSFER_MODULE
               for f in sys.meta_path)
