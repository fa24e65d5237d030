"""Checks of a command's model options before anything is loaded, each failing with one line.

A user's mistake (a ``--model`` path that is not a checkpoint, ``--backend vllm`` without vLLM, a
``--device`` that is not there, an unknown ``--dtype``) raises :class:`UsageError`, which every
command prints as one line and answers with exit status 2, instead of the traceback transformers,
vLLM or torch would give minutes into loading.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UsageError(ValueError):
    """A command-line option cannot work; the message names the option and what to do."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (an OSError's names the file), for a one-line report."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_model_path(model: str, flag: str = "--model") -> None:
    """A local checkpoint directory with ``config.json``, or a Hugging Face Hub id (``org/name``)."""
    path = Path(model).expanduser()
    if not path.exists():
        if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
            return  # a Hub id: transformers or vLLM downloads it (a failure is caught at load)
        raise UsageError(f"{flag} {model}: no such directory; give a checkpoint directory (with config.json) "
                         "or a Hugging Face Hub id such as Qwen/Qwen3-VL-8B-Instruct")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"{flag} {model}: not a checkpoint directory (no config.json in it); give the folder "
                         "save_pretrained wrote")
    if not os.access(path / "config.json", os.R_OK):
        raise UsageError(f"{flag} {model}: config.json is not readable")


def check_backend(backend: str) -> None:
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UsageError("--backend vllm: vLLM is not installed here; on a GPU node install it "
                         "(pip install 'karl-verl[gpu]'), or use --backend hf")


def check_device(device: str | None) -> None:
    """``None`` (auto), ``cpu``, or a CUDA device this machine has."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device}: not a device name; use cpu or cuda (cuda:N for a given GPU)") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError(f"--device {device}: no CUDA device is visible (torch {torch.__version__}); "
                         "use --device cpu, or run on a GPU node")
    if parsed.index is not None and parsed.index >= count:
        raise UsageError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")


def check_dtype(dtype: str) -> None:
    if dtype == "auto":
        return
    import torch

    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise UsageError(f"--dtype {dtype}: not a torch dtype; use auto, bfloat16, float16 or float32")


def check_model_options(model: str, backend: str, device: str | None = None, dtype: str = "auto") -> None:
    """Every check above, in the order a user would fix them."""
    check_model_path(model)
    check_backend(backend)
    if backend == "hf":
        check_device(device)
        check_dtype(dtype)
