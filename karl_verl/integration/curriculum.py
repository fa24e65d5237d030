"""verl glue of the prompt curriculum (``karl.curriculum``): the train loader, observations, checkpoints.

verl 0.9.1 has no sampler plug-in for its train loader, so the ``karl`` trainer replaces the loader
when ``karl.curriculum.enable`` is true (:meth:`KarlTrainer._init_dataloader`): a
:class:`CurriculumLoader`, verl's ``StatefulDataLoader`` over the same dataset and collate function,
whose batches come from a :class:`~karl_verl.curriculum.PromptCurriculum`. With the curriculum off
nothing here runs and verl's loader is untouched.

* The loader draws a batch when the trainer fetches it, in the trainer process (no loader workers:
  a worker would draw batches ahead, with the weights of an earlier table, and a resumed run could
  not draw them again). ``data.dataloader_num_workers`` still applies to validation.
* Rows are keyed by their entity (``extra_info["entity"]``, else the ground truth's marker), read
  from the dataset's dataframe columns ``extra_info`` and ``reward_model`` without loading images;
  levels come from the trainer's current mastery table, by the rule that tags prompts.
* Checkpoints: the curriculum's state goes into verl's ``data.pt`` (it is the loader's index-sampler
  state, saved and restored by verl's own checkpoint code) and into ``karl_curriculum_state.json``
  next to it (readable JSON, written atomically). On resume both must agree, else the run stops
  naming both files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from karl_verl.atomic import atomic_write_text
from karl_verl.config import CurriculumConfig
from karl_verl.curriculum import STATE_FORMAT, CurriculumError, PromptCurriculum
from karl_verl.mastery import MasteryTable, read_json_file
from karl_verl.mastery_state import sample_entity, sample_level

#: The curriculum's state file inside each verl ``global_step_N`` checkpoint folder.
CURRICULUM_FILE = "karl_curriculum_state.json"
#: Where torchdata's single-process loader state keeps the batch sampler's own state (verl's data.pt).
LOADER_SAMPLER_KEY = "_index_sampler_state"

logger = logging.getLogger(__name__)


class CurriculumBatchSampler(Sampler[list[int]]):
    """The curriculum as a batch sampler: one pass is one epoch; stateful for torchdata's loader."""

    def __init__(self, curriculum: PromptCurriculum) -> None:
        self.curriculum = curriculum

    def __iter__(self) -> Iterator[list[int]]:
        return self.curriculum.epoch_batches()

    def __len__(self) -> int:
        return len(self.curriculum)

    def state_dict(self) -> dict[str, Any]:
        return self.curriculum.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(state_dict, source="data.pt")


class CurriculumLoader(StatefulDataLoader):
    """verl's train loader with the curriculum's batches (batch size, collate and drop-last as verl's).

    ``load_state_dict`` (verl's resume, from ``data.pt``) applies the curriculum's state at once
    rather than at the next iteration, as torchdata would: a mastery refresh between resume and the
    first fetch must re-weight the restored sampler, not be undone by it.
    """

    def __init__(self, dataset: Any, curriculum: PromptCurriculum, collate_fn: Any) -> None:
        super().__init__(dataset, batch_sampler=CurriculumBatchSampler(curriculum), num_workers=0,
                         collate_fn=collate_fn)
        self.curriculum = curriculum
        #: The curriculum state found in the last ``data.pt`` loaded (None: none, or verl's own order's).
        self.restored_state: dict[str, Any] | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({})  # a fresh iterator over the restored curriculum
        state = state_dict.get(LOADER_SAMPLER_KEY) if isinstance(state_dict, dict) else None
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
            self.curriculum.load_state_dict(state, source="data.pt")
            self.restored_state = state
        else:
            self.restored_state = None


def dataset_rows(dataset: Any) -> tuple[list[Any], list[Any]]:
    """Per-row ``extra_info`` and ``reward_model`` of verl's RL dataset, from its dataframe (no images)."""
    frame = getattr(dataset, "dataframe", None)
    if frame is None or not hasattr(frame, "column_names"):
        raise CurriculumError(f"karl.curriculum.enable: the training dataset ({type(dataset).__name__}) has no "
                              "dataframe to read entities from; use verl's RLHFDataset or a subclass")
    size = len(frame)
    columns = frame.column_names
    extra_infos = list(frame["extra_info"]) if "extra_info" in columns else [None] * size
    reward_models = list(frame["reward_model"]) if "reward_model" in columns else [None] * size
    return extra_infos, reward_models


class TrainerCurriculum:
    """What the ``karl`` trainer holds when the curriculum is on: the sampler, its loader and the rows."""

    def __init__(self, dataset: Any, config: CurriculumConfig, *, batch_size: int, shuffle: bool, seed: int | None,
                 collate_fn: Any, default_level: int) -> None:
        self.extra_infos, self.reward_models = dataset_rows(dataset)
        if len(self.extra_infos) != len(dataset):
            raise CurriculumError(f"the training dataset has {len(dataset)} rows but its dataframe "
                                  f"{len(self.extra_infos)}")
        self.default_level = default_level
        entities = [sample_entity(e, r) for e, r in zip(self.extra_infos, self.reward_models, strict=True)]
        self.curriculum = PromptCurriculum(entities, config, batch_size=batch_size, shuffle=shuffle, seed=seed)
        self.curriculum.set_levels(self.levels(MasteryTable()))
        self.loader = CurriculumLoader(dataset, self.curriculum, collate_fn)

    @classmethod
    def from_trainer(cls, trainer: Any) -> TrainerCurriculum:
        """Built after verl's ``_init_dataloader``: verl's dataset, batch size, collate, shuffle and seed."""
        data = trainer.config.data
        config = trainer.karl_config.curriculum
        seed = config.seed if config.seed is not None else data.get("seed")
        batch_size = int(data.get("gen_batch_size", None) or data.train_batch_size)
        if int(data.get("dataloader_num_workers", 0) or 0) > 0:
            logger.info("karl.curriculum: training prompts are loaded in the trainer process, each batch when it "
                        "is fetched (data.dataloader_num_workers applies to validation only)")
        built = cls(trainer.train_dataset, config, batch_size=batch_size, shuffle=bool(data.get("shuffle", True)),
                    seed=None if seed is None else int(seed), collate_fn=trainer.train_dataloader.collate_fn,
                    default_level=trainer.karl_default_level)
        logger.info("karl.curriculum: %d rows, %d entities, weights %s, %s", built.curriculum.num_rows,
                    len({e for e in built.curriculum.entities if e}), list(config.level_weights),
                    "verl's own order" if built.curriculum.verl_order else "weighted draws with replacement")
        return built

    def levels(self, table: MasteryTable) -> list[int]:
        return [sample_level(e, r, table, self.default_level)[0]
                for e, r in zip(self.extra_infos, self.reward_models, strict=True)]

    def on_table(self, table: MasteryTable, reason: str) -> None:
        """A new mastery table was installed (train begin or a refresh): new levels, band-pass re-read."""
        record = self.curriculum.reweight(self.levels(table), reason)
        logger.info("karl.curriculum: re-weighted at %s (epoch %d): %d entities skipped (%d new, %d back)%s",
                    reason, record.epoch, record.skipped, record.newly_skipped, record.revisited,
                    "; every drawable row was skipped or weighs 0, fallback weights used" if record.fallback else "")

    def observe(self, extra_infos: Sequence[Any], reward_models: Sequence[Any], valid: np.ndarray,
                accs: Sequence[Any]) -> None:
        """Count this step's rollouts (acc@0.5 per sample; padding rows left out) for the band-pass."""
        entities = [sample_entity(e, r) for e, r, ok in zip(extra_infos, reward_models, valid, strict=True) if ok]
        self.curriculum.observe(entities, [acc for acc, ok in zip(accs, valid, strict=True) if ok])

    def metrics(self) -> dict[str, float]:
        return self.curriculum.consume_metrics()

    def save(self, folder: str) -> None:
        atomic_write_text(os.path.join(folder, CURRICULUM_FILE),
                          json.dumps(self.curriculum.state_dict(), indent=2, ensure_ascii=False) + "\n")

    def restore(self, folder: str, table: MasteryTable) -> None:
        """After verl's resume (``data.pt`` already applied by the loader): check the JSON copy, set the levels."""
        path = os.path.join(folder, CURRICULUM_FILE)
        saved = read_json_file(path, "curriculum state") if os.path.isfile(path) else None
        from_data = self.loader.restored_state
        if saved is not None and from_data is not None and saved != from_data:
            raise CurriculumError(f"{path} and {os.path.join(folder, 'data.pt')} hold different curriculum states "
                                  f"(epoch {saved.get('epoch')} position {saved.get('position')} vs epoch "
                                  f"{from_data.get('epoch')} position {from_data.get('position')}); the "
                                  "checkpoint folder was mixed from two runs")
        if from_data is None and saved is not None:
            logger.warning("karl.curriculum: %s has no curriculum state; continuing from %s", "data.pt", path)
            self.curriculum.load_state_dict(saved, source=path)
        elif saved is None and from_data is None:
            logger.warning("karl.curriculum: the checkpoint in %s has no curriculum state (saved by a run without "
                           "karl.curriculum): the curriculum starts afresh", folder)
        elif saved is None:
            logger.warning("karl.curriculum: %s is missing; continuing from the state in data.pt", path)
        self.curriculum.set_levels(self.levels(table))
