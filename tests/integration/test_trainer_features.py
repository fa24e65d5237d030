"""The trainer's features (karl_verl/integration/features/): the registry, each feature on its own with a
fake trainer, and a resume from karl state files written before the trainer handed its hooks to features."""

import copy
import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from omegaconf import OmegaConf
from tensordict import TensorDict
from trainer_harness import (
    TRAIN_ENTITIES,
    FakeProbeBackend,
    FakeTQ,
    build_trainer,
    compose_base_config,
    dataset_rows,
    ground_truth,
    make_config,
    patched_services,
    write_probe_set,
)
from verl.trainer.ppo.v1.trainer_base import PPOTrainer
from verl.utils import tensordict_utils as tu

from karl_verl.config import KarlConfig
from karl_verl.integration.curriculum import CURRICULUM_FILE
from karl_verl.integration.features import (
    FEATURES,
    Curriculum,
    DynamicSampling,
    Injection,
    Ivgr,
    LevelTagging,
    MasteryRefresh,
    TrainerFeature,
    build_features,
)
from karl_verl.integration.trainer import LEVEL_FIELD, STATE_FILE
from karl_verl.mastery import MasteryTable
from karl_verl.mastery_state import MasteryState
from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

#: karl_mastery_state.json and karl_curriculum_state.json of a checkpoint written by commit fbbb04c (generate.py).
OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "checkpoint_fbbb04c"


@pytest.fixture(scope="module")
def base_config():
    return compose_base_config()


@pytest.fixture()
def tq():
    fake = FakeTQ()
    with patched_services(fake):
        yield fake


def fake_trainer(karl: dict, **config) -> SimpleNamespace:
    """What a feature reads of the trainer, without verl: config, karl_config, steps, dispatch."""
    trainer = SimpleNamespace(config=OmegaConf.create({"algorithm": {"adv_estimator": "karl_grpo"}, **config}),
                              karl_config=KarlConfig.from_mapping(karl), global_steps=0, steps_per_epoch=4,
                              karl_features=[], dispatched=[])
    trainer.karl_default_level = trainer.karl_config.reward.default_level_number
    trainer.karl_dispatch = lambda hook, *args: trainer.dispatched.append(hook)
    return trainer


# ----------------------------------------------------------------------------- registry


def test_the_registry_orders_the_features_and_builds_the_enabled_ones(tmp_path):
    assert FEATURES == (MasteryRefresh, LevelTagging, DynamicSampling, Curriculum, Injection, Ivgr)
    assert all(issubclass(feature, TrainerFeature) for feature in FEATURES)
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"Su-30": {"knowledge_category": "mostly correct"}}))
    trainer = fake_trainer({"mastery": {"table_path": str(table)}})
    assert [type(f) for f in build_features(trainer)] == [MasteryRefresh, LevelTagging]
    trainer = fake_trainer({"mastery": {"table_path": str(table)}, "curriculum": {"enable": True}},
                           algorithm={"adv_estimator": "karl_grpo", "filter_groups": {"enable": True,
                                                                                     "metric": "acc"}})
    assert [type(f) for f in build_features(trainer)] == [MasteryRefresh, LevelTagging, DynamicSampling, Curriculum]


# ----------------------------------------------------------------------------- each feature alone


def test_mastery_refresh_alone_loads_the_table_and_tells_the_others(tmp_path):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"Su-30": {"knowledge_category": "mostly correct"}}))
    trainer = fake_trainer({"mastery": {"table_path": str(table)}})
    feature = MasteryRefresh(trainer)
    assert not feature.state.initialized and feature.schedule.describe() == "off"
    feature.on_train_begin()
    assert feature.state.table.level_of("Su-30") == 2 and trainer.dispatched == ["on_table"]
    assert feature.metrics()["karl/refresh/ok"] == 1 and feature.metrics() == {}
    feature.save_state(str(tmp_path))
    again = MasteryRefresh(trainer)
    again.load_state(str(tmp_path))
    assert again.state.to_json() == feature.state.to_json()


def test_level_tagging_alone_tags_from_the_table_and_counts_defaults():
    trainer = fake_trainer({"mastery": {"source": "online"}})
    trainer.karl_state = MasteryState(table=MasteryTable.from_scores({"Su-30": 0.9}))
    feature = LevelTagging(trainer)
    batch = {"raw_prompt": [None, None], "extra_info": [{}, {}],
             "reward_model": [{"ground_truth": ground_truth("Su-30")}, {"ground_truth": ground_truth("Tu-160")}]}
    feature.tag_val_batch(batch)
    assert batch[LEVEL_FIELD].tolist() == [1, trainer.karl_default_level]
    assert feature.levels(batch["extra_info"], batch["reward_model"], count=True) == batch[LEVEL_FIELD].tolist()
    metrics = feature.metrics()
    assert metrics["karl/level/defaulted"] == 1 and metrics["karl/level/unknown_entities"] == 1
    assert feature.metrics()["karl/level/defaulted"] == 0


def test_dynamic_sampling_alone_counts_refills_per_level():
    trainer = fake_trainer({"mastery": {"source": "online"}},
                           algorithm={"adv_estimator": "karl_grpo", "filter_groups": {"enable": True,
                                                                                     "metric": "acc"}})
    trainer.replay_buffer = None  # not the KarlReplayBuffer: no dropped groups to report
    feature = DynamicSampling(trainer)
    refill = TensorDict({}, batch_size=3)
    tu.assign_non_tensor_stack(refill, LEVEL_FIELD, [1, 3, 3])
    feature.observe_refill(refill)
    assert feature.refilled == Counter({3: 2, 1: 1})
    assert feature.metrics() == {} and feature.refilled == Counter()
    assert not DynamicSampling.enabled(fake_trainer({"mastery": {"source": "online"}}))


def test_curriculum_and_injection_alone_are_off_unless_asked():
    trainer = fake_trainer({"mastery": {"source": "online"}})
    assert not Curriculum.enabled(trainer) and not Injection.enabled(trainer)
    feature = Curriculum(trainer)  # before the train loader: every hook is a no-op
    assert not feature.wants_outcomes and feature.metrics() == {}
    feature.on_table(MasteryTable(), "train_begin")
    feature.save_state("/nonexistent")


# ----------------------------------------------------------------------------- resume from an old checkpoint


def test_resume_from_karl_state_files_written_before_the_features(base_config, tmp_path, tq):
    path, image_entity = write_probe_set(tmp_path / "probe")
    config = make_config(base_config, tmp_path, mastery={"probe_data": path, "source": "blend",
                                                         "online_min_evidence": 2})
    config.karl.curriculum = {"enable": True, "level_weights": [1, 1, 0, 1, 1], "seed": 5}
    tokenizer = build_tiny_tokenizer()
    first = build_trainer(config, tq, tokenizer, backend=FakeProbeBackend(image_entity, known=set()))
    first.global_steps = 4
    PPOTrainer._save_checkpoint(first)  # verl's part of the checkpoint
    folder = tmp_path / "ckpt" / "global_step_4"
    for name in (STATE_FILE, CURRICULUM_FILE):
        shutil.copy(OLD_CHECKPOINT / name, folder / name)

    backend = FakeProbeBackend(image_entity, known=set())
    resumed = build_trainer(copy.deepcopy(config), tq, tokenizer, backend=backend)
    resumed.train_dataset.dataframe = datasets.Dataset.from_list(dataset_rows(TRAIN_ENTITIES))
    resumed.karl_feature(Curriculum).on_init_dataloader()  # verl's _init_dataloader, with the harness's loader
    resumed._load_checkpoint()  # again, now with the curriculum's loader
    saved = json.loads((OLD_CHECKPOINT / STATE_FILE).read_text())
    assert resumed.global_steps == 4 and resumed.karl_state.to_json() == saved
    assert [r.trigger for r in resumed.karl_state.history] == ["train_begin", "epoch"]
    assert resumed.karl_state.table.level_of("MiG-29") == 1 and resumed.karl_state.unknown_entities == {"Tu-160"}
    curriculum_state = json.loads((OLD_CHECKPOINT / CURRICULUM_FILE).read_text())
    assert resumed.karl_curriculum.curriculum.state_dict() == curriculum_state
    resumed.on_train_begin()
    assert backend.calls == 0  # the restored table is used: no probe

    # and the files the new trainer writes are the old ones, byte for byte
    resumed._save_checkpoint()
    for name in (STATE_FILE, CURRICULUM_FILE):
        assert (folder / name).read_text() == (OLD_CHECKPOINT / name).read_text(), name
