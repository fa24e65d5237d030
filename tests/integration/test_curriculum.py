"""The curriculum's verl glue (karl_verl/integration/curriculum.py): loader, rows, data.pt and the JSON copy."""

import copy
import json
import logging

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from trainer_harness import compose_verl_config
from verl.trainer.ppo.utils import create_rl_sampler
from verl.trainer.ppo.v1.trainer_base import PPOTrainer
from verl.utils.dataset.rl_dataset import collate_fn

from karl_verl.config import CurriculumConfig
from karl_verl.curriculum import CurriculumError
from karl_verl.integration import curriculum as glue
from karl_verl.integration.curriculum import CURRICULUM_FILE, CurriculumLoader, TrainerCurriculum, dataset_rows
from karl_verl.integration.trainer import LEVEL_FIELD, KarlTrainer
from karl_verl.mastery import MasteryTable
from karl_verl.mastery_state import RefreshRecord

ENTITIES = ["Su-30", "F-16", "MiG-29", "Tu-160", "J-10"]


class FrameDataset(torch.utils.data.Dataset):
    """verl's RLHFDataset in miniature: a Hugging Face ``dataframe`` and rows built on access."""

    def __init__(self, size=23):
        self.dataframe = datasets.Dataset.from_list([
            {"extra_info": {"index": i, "entity": ENTITIES[i % 5] if i % 7 else ""},
             "reward_model": {"ground_truth": f"<|object_ref_start|>{ENTITIES[i % 5]}<|object_ref_end|>(1,2),(3,4)"}}
            for i in range(size)])
        self.accessed = 0

    def __len__(self):
        return len(self.dataframe)

    def __getitem__(self, index):
        self.accessed += 1
        return {"row": torch.tensor([index]), "index": index, "raw_prompt": [{"role": "user", "content": "Find."}],
                **self.dataframe[index]}


def build(config, dataset=None, *, batch_size=4, seed=3):
    return TrainerCurriculum(dataset or FrameDataset(), config, batch_size=batch_size, shuffle=True, seed=seed,
                             collate_fn=collate_fn, default_level=5)


def verl_loader(dataset, *, seed):
    """verl's own train loader (``PPOTrainer._init_dataloader``) over ``dataset``."""
    sampler = create_rl_sampler(OmegaConf.create({"shuffle": True, "seed": seed}), dataset)
    return StatefulDataLoader(dataset, batch_size=4, drop_last=True, collate_fn=collate_fn, sampler=sampler)


def rows_of(batches):
    return [batch["row"].flatten().tolist() for batch in batches]


def take(loader, count):
    """``count`` batches as verl's ``_fetch_one_gen_batch`` takes them: a new pass when one ends."""
    out, iterator = [], iter(loader)
    while len(out) < count:
        try:
            out.append(next(iterator))
        except StopIteration:
            iterator = iter(loader)
    return out


TABLE = MasteryTable.from_scores({"Su-30": 0.9, "F-16": 0.5, "MiG-29": 0.35, "Tu-160": 0.2})
WEIGHTED = CurriculumConfig(enable=True, level_weights=(1.0, 0.0, 2.0, 1.0, 1.0), max_success_rate=0.9,
                            min_observations=2)


def test_rows_are_read_from_the_dataframe_without_loading_items():
    dataset = FrameDataset()
    extra_infos, reward_models = dataset_rows(dataset)
    assert len(extra_infos) == len(reward_models) == 23 and dataset.accessed == 0
    built = build(WEIGHTED, dataset)
    # entity from extra_info, else from the ground truth's marker (rows 0, 7, 14, 21 have an empty one)
    assert built.curriculum.entities == [ENTITIES[i % 5] for i in range(23)]
    assert built.levels(TABLE)[:5] == [1, 2, 3, 4, 5]  # J-10 is not in the table: the default level
    assert dataset.accessed == 0


def test_a_dataset_without_a_dataframe_is_refused():
    with pytest.raises(CurriculumError, match="no dataframe"):
        build(WEIGHTED, torch.utils.data.TensorDataset(torch.zeros(8)))


def test_uniform_weights_give_verls_batches_through_the_loader():
    dataset = FrameDataset()
    ours = build(CurriculumConfig(enable=True), dataset, seed=11)
    verl = verl_loader(dataset, seed=11)
    assert len(ours.loader) == len(verl) == 5
    assert rows_of(take(ours.loader, 13)) == rows_of(take(verl, 13))


def test_zero_weight_levels_never_come_through_the_loader():
    built = build(WEIGHTED)
    built.on_table(TABLE, "train_begin")
    levels = built.levels(TABLE)
    drawn = [row for batch in rows_of(take(built.loader, 12)) for row in batch]
    assert drawn and all(levels[row] != 2 for row in drawn)
    metrics = built.metrics()
    assert metrics["karl/curriculum/level_2/drawn"] == 0 and metrics["karl/curriculum/reweights"] >= 1


def test_observe_leaves_padding_rows_out_and_feeds_the_band_pass():
    built = build(WEIGHTED)
    built.on_table(TABLE, "train_begin")
    extra = [{"entity": "Su-30"}] * 3 + [{"entity": "F-16"}]
    built.observe(extra, [None] * 4, [True, True, False, True], [1.0, 1.0, 0.0, 1.0])
    assert built.curriculum.counts.counts["Su-30"].successes == 2 and built.curriculum.counts.evidence("Su-30") == 2
    built.on_table(TABLE, "epoch")
    assert set(built.curriculum.skipped) == {"Su-30"}  # 2 of 2 > 0.9; F-16 has 1 < min_observations


def checkpoint(built, folder, steps):
    """What the trainer does: draw ``steps`` batches, then the JSON copy and verl's data.pt."""
    batches = take(built.loader, steps)
    folder.mkdir(parents=True, exist_ok=True)
    built.save(str(folder))
    torch.save(built.loader.state_dict(), folder / "data.pt")
    return batches


@pytest.mark.parametrize("config", [CurriculumConfig(enable=True), WEIGHTED])
@pytest.mark.parametrize("steps", [3, 5, 7])
def test_resume_through_data_pt_and_the_json_copy_draws_the_same_batches(tmp_path, config, steps):
    reference = build(config)
    reference.on_table(TABLE, "train_begin")
    expected = rows_of(take(reference.loader, 12))

    first = build(config)
    first.on_table(TABLE, "train_begin")
    head = rows_of(checkpoint(first, tmp_path / "global_step_2", steps))
    state = json.loads((tmp_path / "global_step_2" / CURRICULUM_FILE).read_text())
    assert torch.load(tmp_path / "global_step_2" / "data.pt", weights_only=False)[glue.LOADER_SAMPLER_KEY] == state

    resumed = build(config)  # a new process: verl loads data.pt into the loader, then the trainer restores
    resumed.loader.load_state_dict(torch.load(tmp_path / "global_step_2" / "data.pt", weights_only=False))
    resumed.restore(str(tmp_path / "global_step_2"), TABLE)
    assert head + rows_of(take(resumed.loader, 12 - steps)) == expected


def test_a_json_copy_that_disagrees_with_data_pt_stops_the_resume_naming_both(tmp_path):
    first = build(WEIGHTED)
    checkpoint(first, tmp_path / "global_step_2", 3)
    other = build(WEIGHTED)
    take(other.loader, 4)
    other.save(str(tmp_path / "global_step_2"))  # the JSON now comes from another run
    resumed = build(WEIGHTED)
    resumed.loader.load_state_dict(torch.load(tmp_path / "global_step_2" / "data.pt", weights_only=False))
    with pytest.raises(CurriculumError, match=rf"{CURRICULUM_FILE} and .*data\.pt hold different"):
        resumed.restore(str(tmp_path / "global_step_2"), TABLE)


def test_a_checkpoint_without_curriculum_state_starts_it_afresh(tmp_path, caplog):
    dataset = FrameDataset()
    verl = verl_loader(dataset, seed=3)
    take(verl, 2)
    resumed = build(WEIGHTED, dataset)
    resumed.loader.load_state_dict(verl.state_dict())  # verl's own order's state: nothing of ours in it
    with caplog.at_level(logging.WARNING, logger=glue.__name__):
        resumed.restore(str(tmp_path), TABLE)
    assert "starts afresh" in caplog.text
    fresh = build(WEIGHTED, dataset)
    fresh.curriculum.set_levels(fresh.levels(TABLE))
    assert rows_of(take(resumed.loader, 3)) == rows_of(take(fresh.loader, 3))


def test_only_the_json_copy_is_enough(tmp_path, caplog):
    first = build(WEIGHTED)
    first.on_table(TABLE, "train_begin")
    checkpoint(first, tmp_path / "global_step_2", 3)
    expected = rows_of(take(first.loader, 4))
    resumed = build(WEIGHTED)  # data.pt lost: nothing loaded into the loader
    with caplog.at_level(logging.WARNING, logger=glue.__name__):
        resumed.restore(str(tmp_path / "global_step_2"), TABLE)
    assert "continuing from" in caplog.text
    assert rows_of(take(resumed.loader, 4)) == expected


# ----------------------------------------------------------------------------- the karl trainer's hooks


@pytest.fixture(scope="module")
def trainer_config():
    return compose_verl_config("algorithm.adv_estimator=karl_grpo", "trainer.v1.trainer_mode=karl",
                               "data.train_batch_size=4", "data.seed=5",
                               "actor_rollout_ref.actor.ppo_mini_batch_size=4")


def karl_trainer(config, monkeypatch, curriculum):
    """A KarlTrainer whose verl ``_init_dataloader`` builds verl's loader over a FrameDataset."""
    config = copy.deepcopy(config)
    config.karl = {"mastery": {"source": "online"}, "curriculum": curriculum}
    trainer = KarlTrainer(config)

    def verl_init_dataloader(self):
        self.train_dataset = FrameDataset()
        self.train_dataloader = verl_loader(self.train_dataset, seed=config.data.seed)
        self.train_dataloader_it = None
        self.steps_per_epoch = len(self.train_dataset) // config.data.train_batch_size

    monkeypatch.setattr(PPOTrainer, "_init_dataloader", verl_init_dataloader)
    trainer._init_dataloader()
    return trainer


def test_the_trainer_keeps_verls_loader_with_the_curriculum_off(trainer_config, monkeypatch):
    trainer = karl_trainer(trainer_config, monkeypatch, {})
    assert trainer.karl_curriculum is None and type(trainer.train_dataloader) is StatefulDataLoader
    assert not any(key.startswith("karl/curriculum") for key in trainer.karl_consume_metrics())


def test_the_trainer_draws_through_the_curriculum_and_tags_the_same_levels(trainer_config, monkeypatch):
    trainer = karl_trainer(trainer_config, monkeypatch, {"enable": True, "level_weights": [1, 0, 1, 1, 1]})
    assert isinstance(trainer.train_dataloader, CurriculumLoader) and trainer.karl_curriculum is not None
    assert trainer.karl_curriculum.curriculum.batch_size == 4 and trainer.karl_curriculum.curriculum.seed == 5
    trainer.global_steps = 1
    record = RefreshRecord(step=1, epoch=0, trigger="train_begin", source="table_file")
    trainer.karl_mastery.swap(TABLE, base=TABLE, record=record, time_share=None)  # a table is installed
    levels = [level for _ in range(6) for level in trainer._fetch_one_gen_batch()[LEVEL_FIELD]]
    assert len(levels) == 24 and 2 not in levels  # F-16 is level 2, weight 0
    metrics = trainer.karl_consume_metrics()
    assert [metrics[f"karl/curriculum/level_{k}/drawn"] for k in range(1, 6)] == [levels.count(k) for k in range(1, 6)]
    assert metrics["karl/curriculum/reweights"] == 3  # the table, the first epoch start, the second


def test_only_data_pt_is_enough(tmp_path, caplog):
    first = build(WEIGHTED)
    first.on_table(TABLE, "train_begin")
    checkpoint(first, tmp_path / "global_step_2", 3)
    (tmp_path / "global_step_2" / CURRICULUM_FILE).unlink()
    expected = rows_of(take(first.loader, 4))
    resumed = build(WEIGHTED)
    resumed.loader.load_state_dict(torch.load(tmp_path / "global_step_2" / "data.pt", weights_only=False))
    with caplog.at_level(logging.WARNING, logger=glue.__name__):
        resumed.restore(str(tmp_path / "global_step_2"), TABLE)
    assert f"{CURRICULUM_FILE} is missing" in caplog.text
    assert rows_of(take(resumed.loader, 4)) == expected
