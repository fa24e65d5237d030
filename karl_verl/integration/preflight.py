"""Hydra callback that stops a run at once when a key the recipe requires is unset.

Runs in the driver, inside Hydra, before verl's ``main`` (and so before Ray starts): without it
a missing model path surfaces minutes later inside a Ray actor. The recipe lists its required
keys (``hydra.callbacks.karl_required_keys.keys``) and sets them to null. For the ``karl`` trainer
the callback also runs the trainer's own checks of ``karl.*`` (e.g. neither a mastery table nor a
probe set), which would otherwise fail inside the TaskRunner after Ray has started.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def unset_keys(config: DictConfig, keys: Iterable[str]) -> list[str]:
    """The dotted ``keys`` whose value in ``config`` is absent, null, ``???`` or an empty string."""
    unset = []
    for key in keys:
        value = OmegaConf.select(config, key, default=None, throw_on_missing=False)
        if value is None or (isinstance(value, str) and value.strip() in ("", "???")):
            unset.append(key)
    return unset


def karl_config_problems(config: DictConfig) -> list[str]:
    """What in ``karl.*`` / ``algorithm.karl`` would stop the ``karl`` trainer at construction.

    The same checks the trainer runs (the config dataclasses and
    :meth:`~karl_verl.config.MasteryConfig.missing_inputs`), run early. Only for runs whose
    ``trainer.v1.trainer_mode`` is ``karl``: other trainers never read these keys.
    """
    from karl_verl.config import KarlConfig

    if OmegaConf.select(config, "trainer.v1.trainer_mode", default=None) != "karl":
        return []
    _, mastery, problems = KarlConfig.check_sections(OmegaConf.select(config, "karl", default=None),
                                                     OmegaConf.select(config, "algorithm.karl", default=None))
    if mastery is not None and (problem := mastery.missing_inputs()):
        problems.append(problem)
    return problems


#: The example command of the stop message, unless the recipe gives its own (``example``).
MAIN_PPO_EXAMPLE = (
    "python -m verl.trainer.main_ppo +recipe=karl_kvg data.train_files=/data/train.parquet "
    "data.val_files=/data/val.parquet actor_rollout_ref.model.path=/models/Qwen3-VL-8B-Instruct "
    "trainer.default_local_dir=/ckpt/karl_kvg karl.mastery.probe_data=/data/probe.parquet"
)


class RequiredKeysCallback(Callback):
    def __init__(self, keys: Iterable[str] = (), example: str | None = None) -> None:
        self.keys = list(keys)
        self.example = example or MAIN_PPO_EXAMPLE

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        unset = unset_keys(config, self.keys)
        problems = karl_config_problems(config)
        if not unset and not problems:
            return
        lines = []
        if unset:
            listing = "\n".join(f"  {key}=..." for key in unset)
            lines.append(
                f"karl-verl: this recipe needs these keys set on the command line:\n{listing}\ne.g. {self.example}"
            )
        if problems:
            lines.append("karl-verl: the KARL settings cannot work:\n" + "\n".join(f"  {p}" for p in problems))
        # SystemExit, not an exception: Hydra logs and swallows exceptions raised by callbacks.
        raise SystemExit("\n".join(lines))
