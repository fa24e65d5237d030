"""The interface between :class:`~karl_verl.integration.trainer.KarlTrainer` and its features.

The trainer overrides verl's hooks and hands each one to its features, in registration order
(:data:`karl_verl.integration.features.FEATURES`). A feature overrides the hooks it needs; every
hook of :class:`TrainerFeature` is a no-op by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transfer_queue as tq

from karl_verl.integration.tq_fields import padded, row_field
from karl_verl.mastery import MasteryTable
from karl_verl.mastery_state import finite_or_none

#: The trainer's logger: features log under it, so that one logger shows (and filters) all of the trainer.
logger = logging.getLogger("karl_verl.integration.trainer")


def reward_infos(data: Any, size: int) -> list[dict]:
    """Each row's reward breakdown (``extra_fields["reward_extra_info"]``), {} where there is none."""
    return [extra.get("reward_extra_info", {}) if isinstance(extra, dict) else {}
            for extra in row_field(data, "extra_fields", size)]


@dataclass
class Rollouts:
    """One step's trained rollouts as the features observe them (after the advantage is computed).

    ``batch`` is the TransferQueue meta of the step; every array has one entry per row; ``valid`` is
    False on padding rows (verl's ``is_padding`` tag).
    """

    batch: Any
    levels: np.ndarray
    valid: np.ndarray
    rewards: np.ndarray
    advantages: np.ndarray
    infos: list[dict]
    ious: np.ndarray
    accs: np.ndarray
    extra_infos: list[Any]
    reward_models: list[Any]

    @classmethod
    def fetch(cls, batch: Any, levels: np.ndarray) -> Rollouts:
        fields = ["advantages", "response_mask", "rm_scores", "extra_fields", "extra_info", "reward_model"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        size = len(batch)
        mask = padded(data["response_mask"]).float()
        token_count = mask.sum(dim=-1)
        advantage_sum = (padded(data["advantages"]).float() * mask).sum(dim=-1)
        infos = reward_infos(data, size)
        return cls(
            batch=batch, levels=levels,
            valid=np.array([not tag.get("is_padding", False) for tag in batch.tags], dtype=bool),
            rewards=padded(data["rm_scores"]).float().sum(dim=-1).numpy(),
            advantages=torch.where(token_count > 0, advantage_sum / token_count.clamp(min=1), torch.nan).numpy(),
            infos=infos,
            ious=np.array([finite_or_none(info.get("iou")) for info in infos], dtype=object),
            accs=np.array([finite_or_none(info.get("acc")) for info in infos], dtype=object),
            extra_infos=row_field(data, "extra_info", size), reward_models=row_field(data, "reward_model", size),
        )


class TrainerFeature:
    """One KARL feature of the trainer: overrides the hooks it needs, each a no-op here.

    Built once per trainer (in ``KarlTrainer.__init__``, after verl's) when :meth:`enabled` says so;
    ``trainer`` is the :class:`~karl_verl.integration.trainer.KarlTrainer` (``karl_config``,
    ``config``, ``global_steps``, ... and the other features through ``trainer.karl_feature``).
    """

    #: Whether :meth:`observe_outcomes` wants the outcomes of groups dynamic sampling drops (their
    #: rows are read from TransferQueue only when some feature does).
    wants_outcomes: bool = False

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._warned: set[str] = set()

    @classmethod
    def enabled(cls, trainer: Any) -> bool:
        """Whether this trainer's configuration asks for the feature."""
        return True

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # -- setup
    def build_replay_buffer(self, build: Callable[[], Any]) -> Any | None:
        """A replay buffer of the feature's own (``build()`` makes verl's), or None for verl's."""
        return None

    def on_setup(self) -> None:
        """After verl's ``_setup`` (workers started)."""

    def on_init_dataloader(self) -> None:
        """After verl's ``_init_dataloader`` (``trainer.train_dataloader`` may be replaced here)."""

    # -- loop
    def on_train_begin(self) -> None:
        """After verl's ``on_train_begin``."""

    def on_validate_begin(self) -> None:
        """Before verl's ``_validate`` (which ``fit`` may run before ``on_train_begin``)."""

    def on_step_begin(self) -> None:
        """After verl's ``on_step_begin`` (rollout replicas are awake)."""

    def on_step_end(self) -> None:
        """After verl's ``on_step_end``."""

    def on_table(self, table: MasteryTable, trigger: str) -> None:
        """A new mastery table was installed (``trigger``: "train_begin", "epoch", "step", ...)."""

    # -- samples
    def rows_per_prompt(self) -> int:
        """Rows each dataloader prompt becomes in a training batch (:meth:`expand_prompts`); 1: unchanged."""
        return 1

    def expand_prompts(self, batch: Any) -> Any:
        """A training prompt batch (TensorDict, verl's ``uid`` assigned) with rows added or rewritten, before
        any :meth:`tag_prompts`; returns the batch (the same one when unchanged)."""
        return batch

    def tag_prompts(self, batch: Any) -> None:
        """Put fields on a training prompt batch (TensorDict) before it goes to rollout."""

    def tag_val_batch(self, batch_dict: dict) -> None:
        """Put fields on a validation batch dict."""

    def observe_refill(self, batch: Any) -> None:
        """Prompts generated to replace groups the dynamic-sampling filter dropped (tagged already)."""

    def after_old_log_prob(self, batch: Any, metrics: dict) -> None:
        """After verl's ``_compute_old_log_prob``."""

    def before_advantage(self, batch: Any, metrics: dict) -> None:
        """Rewards (``rm_scores`` in TransferQueue) are known; the advantage is not computed yet."""

    def on_policy_rows(self, batch: Any) -> np.ndarray | None:
        """Which rows of ``batch`` count in the advantage's group statistics, or None (all)."""
        return None

    def observe_rollouts(self, rollouts: Rollouts) -> None:
        """One step's trained rollouts, after the advantage."""

    def observe_outcomes(self, extra_infos: Sequence[Any], reward_models: Sequence[Any], valid: np.ndarray,
                         accs: Sequence[float | None]) -> None:
        """Rollout outcomes (acc@0.5), of trained groups and of groups dynamic sampling dropped."""

    # -- metrics and checkpoints
    def metrics(self) -> dict[str, float]:
        """The metrics gathered since the last call (once per step), then reset."""
        return {}

    def save_state(self, folder: str) -> None:
        """Write the feature's state into the ``global_step_N`` folder (before verl's checkpoint)."""

    def load_state(self, folder: str) -> None:
        """Restore the feature's state from the ``global_step_N`` folder verl just resumed from."""
