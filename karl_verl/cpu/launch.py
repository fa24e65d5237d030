"""The Hydra callbacks of the CPU recipes: the CPU execution layer on in the driver before anything starts,
and, for verl's SFT trainer started without torchrun, a one-process group's variables."""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

#: What torchrun gives each process and verl's ``initialize_global_process_group`` reads.
TORCHRUN_VARIABLES: tuple[str, ...] = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class CpuExecutionCallback(Callback):
    """``hydra.callbacks.karl_cpu`` in ``karl_kvg_cpu`` and ``karl_cot_sft_cpu``: :func:`karl_verl.cpu.activate`
    at job start.

    Runs in the ``main_ppo`` driver after Hydra composed the config and before verl's ``main``
    starts Ray, so the local Ray cluster and every actor inherit the CPU layer's environment; in
    ``sft_trainer`` before the process group and the engine are built.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        from karl_verl.cpu import activate

        activate()
        # verl's file logger (the recipe's second logger) writes under the working directory unless told
        # otherwise; the run's own folder keeps it with the checkpoints.
        folder = OmegaConf.select(config, "trainer.default_local_dir", default=None)
        if folder and not os.environ.get("VERL_FILE_LOGGER_PATH"):
            os.environ.setdefault("VERL_FILE_LOGGER_ROOT", str(folder))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def single_process_group_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The torchrun variables of a one-process group that ``environ`` lacks; none when it has any of them.

    A process started by torchrun (any of the variables set) is left as torchrun made it; a plain
    ``python -m verl.trainer.sft_trainer`` becomes rank 0 of 1 on a free local port.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in TORCHRUN_VARIABLES):
        return {}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}


class SingleProcessGroupCallback(Callback):
    """``hydra.callbacks.karl_single_process`` in ``karl_cot_sft_cpu``: ``python -m verl.trainer.sft_trainer``
    without torchrun runs as a one-process group.

    verl's SFT trainer reads ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (``verl/utils/distributed.py``)
    and its process group rendezvous at ``MASTER_ADDR:MASTER_PORT``, all of which only torchrun sets.
    Under torchrun nothing changes (:func:`single_process_group_environment`).
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.update(single_process_group_environment())
