"""Reading per-row fields of TransferQueue / TensorDict batches as plain Python values.

Shared by the ``karl`` trainer and the injection driver (both run in verl's TaskRunner): a field
comes back as a tensor, a nested tensor (one row per response), a ``NonTensorStack``, a numpy
array or a list, depending on what wrote it.
"""

from __future__ import annotations

from typing import Any

import torch


def row_values(data: Any) -> list[Any]:
    """Per-row Python values of a TensorDict field (tensor, NonTensorStack, numpy array or list)."""
    if isinstance(data, torch.Tensor):
        return data.tolist()
    if hasattr(data, "tolist"):
        return list(data.tolist())
    return list(data)


def padded(tensor: torch.Tensor) -> torch.Tensor:
    """A per-response TransferQueue tensor as [batch, max_len], zero-padded (TransferQueue nests them)."""
    return tensor.to_padded_tensor(0.0) if tensor.is_nested else tensor


def row_field(data: Any, key: str, size: int) -> list[Any]:
    """``data[key]`` as per-row values, or Nones when the field is absent (dict or TensorDict)."""
    if key not in data.keys():
        return [None] * size
    values = row_values(data[key])
    return values if len(values) == size else [None] * size
