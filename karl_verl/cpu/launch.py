"""The Hydra callback of the CPU recipe: turns the CPU execution layer on in the driver, before Ray starts."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class CpuExecutionCallback(Callback):
    """``hydra.callbacks.karl_cpu`` in ``karl_kvg_cpu``: :func:`karl_verl.cpu.activate` at job start.

    Runs in the ``main_ppo`` driver after Hydra composed the config and before verl's ``main``
    starts Ray, so the local Ray cluster and every actor inherit the CPU layer's environment.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from karl_verl.cpu import activate

        activate()
