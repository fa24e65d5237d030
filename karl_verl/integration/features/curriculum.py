"""The prompt curriculum's trainer hooks (``karl.curriculum.enable``): the train loader draws through
:class:`~karl_verl.integration.curriculum.TrainerCurriculum`, which hears of every new table and of
rollout outcomes, reports ``karl/curriculum/*`` and is saved with each checkpoint (``CURRICULUM_FILE``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from karl_verl.integration.curriculum import TrainerCurriculum
from karl_verl.integration.features.base import TrainerFeature
from karl_verl.mastery import MasteryTable


class Curriculum(TrainerFeature):
    """Holds the :class:`TrainerCurriculum`, built with the train loader (None before)."""

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        self.curriculum: TrainerCurriculum | None = None

    @classmethod
    def enabled(cls, trainer: Any) -> bool:
        return bool(trainer.karl_config.curriculum.enable)

    @property
    def wants_outcomes(self) -> bool:  # type: ignore[override]
        return self.curriculum is not None

    def on_init_dataloader(self) -> None:
        self.curriculum = TrainerCurriculum.from_trainer(self.trainer)
        self.trainer.train_dataloader = self.curriculum.loader

    def on_table(self, table: MasteryTable, trigger: str) -> None:
        if self.curriculum is not None:
            self.curriculum.on_table(table, trigger)

    def observe_outcomes(self, extra_infos: Sequence[Any], reward_models: Sequence[Any], valid: np.ndarray,
                         accs: Sequence[float | None]) -> None:
        if self.curriculum is not None:
            self.curriculum.observe(extra_infos, reward_models, valid, accs)

    def metrics(self) -> dict[str, float]:
        return {} if self.curriculum is None else self.curriculum.metrics()

    def save_state(self, folder: str) -> None:
        if self.curriculum is not None:
            self.curriculum.save(folder)

    def load_state(self, folder: str) -> None:
        """After the mastery state (registered before): the curriculum's levels come from the restored table."""
        if self.curriculum is not None:
            self.curriculum.restore(folder, self.trainer.karl_state.table)
