"""The ``karl`` trainer (karl_verl/integration/trainer.py) against verl's real v1 trainer.

verl's own code runs everywhere (``PPOTrainer.__init__`` from verl's composed default config,
``fit``, ``step``, the replay buffer, ``_compute_old_log_prob``, ``_compute_metrics``,
``_validate``, ``_save_checkpoint`` / ``_load_checkpoint``, the ``karl`` reward manager loaded as
verl's reward loop loads it, the real probe runner). Fakes stand in only for what needs GPUs or
rollout servers, and for the TransferQueue service: those of ``tests/_support/trainer_harness.py``
(:class:`FakeTQ`, :class:`FakeRollout`, :class:`FakeActorWorkers`, and :class:`FakeProbeBackend`
for the probe's answers from the vLLM replicas).
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import trainer_harness
from tensordict import TensorDict
from trainer_harness import (
    ALPHA,
    HIT,
    MISS,
    PROBED,
    FakeProbeBackend,
    FakeRollout,
    FakeTQ,
    RecordingTracking,
    compose_base_config,
    ground_truth,
    make_config,
    patched_services,
    write_probe_set,
)
from transfer_queue import KVBatchMeta
from verl import DataProto
from verl.trainer.ppo.v1 import get_trainer_cls, replay_buffer
from verl.trainer.ppo.v1.trainer_base import PPOTrainer
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from karl_verl.advantage import compute_karl_grpo_advantage
from karl_verl.config import AdvantageConfig, ConfigError
from karl_verl.integration import trainer as karl_trainer
from karl_verl.integration.trainer import LEVEL_FIELD, STATE_FILE, KarlTrainer
from karl_verl.mastery import MasteryTable
from karl_verl.mastery_state import MasteryState
from karl_verl.probe.runner import ProbeResult
from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

TRAIN_ENTITIES = ["Su-30", "F-16", "MiG-29", "Tu-160"]  # two steps an epoch; Tu-160 is in no table: default level


def half_right(entity: str, session: int, step: int) -> str:
    """The fake model's answer: sessions 0 and 1 hit the box, the others miss it."""
    return HIT if session < 2 else MISS


def build_trainer(config, tq, tokenizer, **kwargs):
    """The harness's trainer, on this module's :data:`TRAIN_ENTITIES` in order unless told otherwise."""
    kwargs.setdefault("entities", TRAIN_ENTITIES)
    return trainer_harness.build_trainer(config, tq, tokenizer, **kwargs)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_config():
    return compose_base_config()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tq():
    fake = FakeTQ()
    with patched_services(fake):
        yield fake


@pytest.fixture(scope="module")
def probe_set(tmp_path_factory):
    """A parquet probe set: 2 images per aircraft; returns (path, image bytes -> entity)."""
    return write_probe_set(tmp_path_factory.mktemp("probe"))


def metric_series(name):
    return {step: data[name] for step, data in RecordingTracking.logged if name in data}


# ----------------------------------------------------------------------------- registration


def test_registered_as_verl_trainer_karl():
    assert get_trainer_cls("karl") is KarlTrainer
    assert issubclass(KarlTrainer, PPOTrainer)
    karl_trainer.register()  # idempotent
    assert karl_trainer.is_registered()


def test_takes_the_sync_paths_of_verl(base_config, tmp_path):
    """verl branches on trainer_mode == "sync"; with the mode name "karl" it would build async parts."""
    trainer = KarlTrainer(make_config(base_config, tmp_path, mastery={"source": "online"}))
    assert trainer.config.trainer.v1.trainer_mode == "karl" and trainer.trainer_mode == "sync"
    assert type(trainer.replay_buffer) is replay_buffer.ReplayBuffer and trainer.parameter_sync_step == 1


def test_config_without_table_or_probe_set_fails_at_construction(base_config, tmp_path):
    with pytest.raises(ConfigError, match="table_path"):
        KarlTrainer(make_config(base_config, tmp_path, mastery={"source": "probe"}))


# ----------------------------------------------------------------------------- end to end


def test_fit_levels_travel_to_reward_advantage_and_metrics(base_config, tmp_path, tq, tokenizer, probe_set):
    """Two epochs of verl's real ``fit``: probe at begin, refresh at the epoch boundary, checkpoints."""
    path, image_entity = probe_set
    backend = FakeProbeBackend(image_entity, known={"Su-30"})
    config = make_config(base_config, tmp_path, mastery={"probe_data": path, "probe_images_per_entity": 2},
                         advantage=ALPHA, save_freq=2, test_freq=4)
    trainer = build_trainer(config, tq, tokenizer, backend=backend)
    rollout = FakeRollout(tq, config, tokenizer, half_right)
    spy = []
    original = karl_trainer.compute_karl_grpo_advantage

    def recording(**kwargs):
        spy.append({k: kwargs[k] for k in ("token_level_rewards", "response_mask", "index", "mastery_levels")})
        return original(**kwargs)

    karl_trainer.compute_karl_grpo_advantage = recording
    try:
        # the model "learns" F-16 during epoch 0: the refresh at the start of epoch 1 must see it
        trainer.on_step_end = lambda: (PPOTrainer.on_step_end(trainer), backend.known.add("F-16"),
                                       trainer.checkpoint_manager.update_weights())
        trainer.fit(rollout)
    finally:
        karl_trainer.compute_karl_grpo_advantage = original

    # probe at train begin + refresh at the start of epoch 1 (step 3), on the fake rollout servers
    history = trainer.karl_state.history
    assert [(r.trigger, r.step, r.source, r.status) for r in history] == [
        ("train_begin", 1, "probe", "ok"), ("epoch", 3, "probe", "ok")]
    assert history[1].moved_up == 1 and trainer.karl_state.table.level_of("F-16") == 1
    levels_before = {"Su-30": 1, "F-16": 5, "MiG-29": 5, "Tu-160": 5}

    # the reward manager (reward-loop side) saw the level the trainer put on the sample
    train_scored = [s for s in rollout.scored if s["partition"] == "train"]
    assert len(train_scored) == 4 * 2 * 4  # 4 steps x 2 prompts x n=4
    for s in train_scored:
        assert s["level"] == s["sent_level"]
    assert {s["entity"]: s["level"] for s in train_scored[:16]} == levels_before
    assert {s["entity"]: s["level"] for s in train_scored[16:]}["F-16"] == 1

    # karl_grpo got exactly those levels, in TransferQueue order, and its weighting reached the update
    assert len(spy) == 4
    for call in spy:
        assert call["mastery_levels"].tolist()[0] in (1, 5)
        weighted, _ = compute_karl_grpo_advantage(token_level_rewards=call["token_level_rewards"],
                                                  response_mask=call["response_mask"], index=call["index"],
                                                  config=config.algorithm, mastery_levels=call["mastery_levels"])
        plain, _ = compute_karl_grpo_advantage(token_level_rewards=call["token_level_rewards"],
                                               response_mask=call["response_mask"], index=call["index"])
        level5 = np.asarray(call["mastery_levels"]) == 5
        if level5.any():
            pos = (plain[:, 0] > 0) & torch.from_numpy(level5)
            assert torch.equal(weighted[pos, 0], plain[pos, 0] * 3.0)

    # metrics reached verl's logger every step
    for step in (1, 2, 3, 4):
        logged = dict(RecordingTracking.logged)[step]
        assert logged["karl/level_1/count"] + logged["karl/level_5/count"] == 8
        for level in (1, 5):
            for key in ("reward_mean", "iou_mean", "acc@0.5", "adv_mean"):
                assert (f"karl/level_{level}/{key}" in logged) == (logged[f"karl/level_{level}/count"] > 0)
    assert metric_series("karl/level_1/acc@0.5")[1] == pytest.approx(0.5)
    assert metric_series("karl/level/defaulted") == {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0}  # Tu-160, once per epoch
    assert metric_series("karl/level/unknown_entities")[4] == 1.0
    assert set(metric_series("karl/refresh/probe_time_s")) == {1, 3}
    assert metric_series("karl/refresh/entities_up") == {1: 0.0, 3: 1.0}
    assert 0.0 <= metric_series("karl/refresh/probe_time_share")[3] <= 1.0
    assert metric_series("karl/mastery/level_1/entities") == {1: 1.0, 3: 2.0}

    # validation prompts carried levels too (J-10 is level 5, Su-30 level 1)
    val_scored = [s for s in rollout.scored if s["partition"] == "val"]
    assert {s["entity"]: s["level"] for s in val_scored} == {"Su-30": 1, "J-10": 5}

    # each checkpoint folder holds the mastery state (JSON) beside verl's files
    for step in (2, 4):
        folder = tmp_path / "ckpt" / f"global_step_{step}"
        assert (folder / "actor" / "weights.txt").is_file() and (folder / "data.pt").is_file()
        saved = json.loads((folder / STATE_FILE).read_text())
        assert len(saved["history"]) == (1 if step == 2 else 2)
    assert backend.calls >= 2


def test_validation_before_training_sees_the_first_table(base_config, tmp_path, tq, tokenizer, probe_set):
    """verl validates before on_train_begin: that first validation must already use the probed levels."""
    path, image_entity = probe_set
    backend = FakeProbeBackend(image_entity, known={"Su-30"})
    config = make_config(base_config, tmp_path, mastery={"probe_data": path, "probe_images_per_entity": 2},
                         val_before_train=True, total_epochs=1)
    trainer = build_trainer(config, tq, tokenizer, backend=backend)
    rollout = FakeRollout(tq, config, tokenizer, half_right)
    trainer.fit(rollout)

    val_scored = [s for s in rollout.scored if s["partition"] == "val"]
    assert val_scored, "verl's fit did not validate before training"
    assert {s["entity"]: s["level"] for s in val_scored} == {"Su-30": 1, "J-10": 5}
    # one probe, before the first validation; on_train_begin kept its table
    assert [(r.trigger, r.step, r.source) for r in trainer.karl_state.history] == [("train_begin", 0, "probe")]
    assert backend.calls == 1


# ----------------------------------------------------------------------------- _compute_advantage


def fill_tq(tq, *, levels, scores, n=4, lengths=None, padding=0):
    """One training batch already rolled out and scored: len(levels) prompts x n sessions."""
    keys, tags = [], []
    rng = np.random.default_rng(0)
    for p, level in enumerate(levels):
        uid = f"u{p:03d}"
        for s in range(n):
            length = int(lengths[p][s]) if lengths is not None else int(rng.integers(3, 9))
            rm = torch.zeros(length)
            rm[-1] = float(scores[p][s])
            key = f"{uid}_{s}_0"
            tq.kv_batch_put([key], "train", fields=list_of_dict_to_tensordict([{
                "uid": uid, "response_mask": torch.ones(length, dtype=torch.int64), "rm_scores": rm,
                "old_log_probs": torch.zeros(length), LEVEL_FIELD: int(level),
                "extra_fields": {"reward_extra_info": {"iou": float(scores[p][s] > 0), "acc": float(scores[p][s] > 0)}},
                "extra_info": {"entity": f"E{p}"},
                "reward_model": {"ground_truth": ground_truth(f"E{p}")},
            }]), tags=[{"status": "success", "is_padding": p >= len(levels) - padding}])
            keys.append(key)
            tags.append({"status": "success", "is_padding": p >= len(levels) - padding})
    return KVBatchMeta(partition_id="train", keys=keys, tags=tags)


def read_advantages(tq, batch):
    data = tq.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["advantages", "returns"])
    return data["advantages"].to_padded_tensor(0.0), data["returns"].to_padded_tensor(0.0)


@pytest.mark.parametrize("seed", range(3))
def test_identity_weights_give_verl_grpo_bitwise(base_config, tmp_path, tq, seed):
    """The override with all-ones weights writes exactly what verl's own _compute_advantage (grpo) writes."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(1, 6, size=5)
    scores = rng.choice([-0.6, 0.0, 0.7, 1.5, 2.0], size=(5, 4))
    trainer = KarlTrainer(make_config(base_config, tmp_path, mastery={"source": "online"}))
    batch = fill_tq(tq, levels=levels, scores=scores)
    trainer._compute_advantage(batch, {})
    ours = read_advantages(tq, batch)

    config = copy.deepcopy(trainer.config)
    config.algorithm.adv_estimator = "grpo"
    verl_trainer = object.__new__(KarlTrainer)
    verl_trainer.config = config
    PPOTrainer._compute_advantage(verl_trainer, batch, {})
    theirs = read_advantages(tq, batch)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_levels_from_transfer_queue_reach_karl_grpo(base_config, tmp_path, tq, monkeypatch):
    levels = [1, 5, 4, 2]
    scores = [[2.0, 0.0, 1.0, 0.5]] * 4
    trainer = KarlTrainer(make_config(base_config, tmp_path, mastery={"source": "online"}, advantage=ALPHA))
    batch = fill_tq(tq, levels=levels, scores=scores)
    seen = {}
    original = karl_trainer.compute_karl_grpo_advantage

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(karl_trainer, "compute_karl_grpo_advantage", spy)
    metrics = {}
    trainer._compute_advantage(batch, metrics)
    assert seen["mastery_levels"].tolist() == [level for level in levels for _ in range(4)]
    advantages, _ = read_advantages(tq, batch)
    # verl's GRPO on the same rewards, then weighted per level (KARL_METHOD.md section 5)
    uids = np.array([f"u{p}" for p in range(4) for _ in range(4)], dtype=object)
    data = DataProto.from_dict(tensors={"token_level_rewards": torch.tensor([[s] for row in scores for s in row]),
                                        "response_mask": torch.ones(16, 1)}, non_tensors={"uid": uids})
    plain = compute_advantage_for_multi_trajectories(data, batch_keys=batch.keys, adv_estimator="grpo")
    plain = plain.batch["advantages"]
    config = AdvantageConfig(**{k: tuple(v) for k, v in ALPHA.items()})
    level_rows = torch.tensor([level for level in levels for _ in range(4)]) - 1
    weight = torch.where(plain[:, 0] > 0, torch.tensor(config.alpha_plus)[level_rows],
                         torch.tensor(config.alpha_minus)[level_rows])
    assert torch.allclose(advantages[:, 0], plain[:, 0] * weight)
    stats = trainer.karl_consume_metrics()
    assert stats["karl/level_5/count"] == 4 and stats["karl/level_3/count"] == 0
    assert stats["karl/level_1/reward_mean"] == pytest.approx(0.875)


def test_missing_level_field_falls_back_to_table_and_is_counted(base_config, tmp_path, tq):
    trainer = KarlTrainer(make_config(base_config, tmp_path, mastery={"source": "online"}))
    trainer.karl_state.table = MasteryTable.from_scores({"E0": 0.9})
    batch = fill_tq(tq, levels=[3, 3], scores=[[1, 0, 1, 0]] * 2)
    for record in tq.parts["train"].values():
        record["fields"].pop(LEVEL_FIELD)
    assert trainer.karl_levels.fetch_levels(batch).tolist() == [1] * 4 + [5] * 4
    assert trainer.karl_consume_metrics()["karl/level/missing_field"] == 8


def test_level_field_on_some_samples_only_falls_back_for_all(base_config, tmp_path, tq):
    """The real TransferQueue raises when a selected field is missing on some samples."""
    trainer = KarlTrainer(make_config(base_config, tmp_path, mastery={"source": "online"}))
    trainer.karl_state.table = MasteryTable.from_scores({"E0": 0.9, "E1": 0.5})
    batch = fill_tq(tq, levels=[3, 3], scores=[[1, 0, 1, 0]] * 2)
    first = next(iter(tq.parts["train"].values()))
    first["fields"].pop(LEVEL_FIELD)
    assert trainer.karl_levels.fetch_levels(batch).tolist() == [1] * 4 + [2] * 4
    assert trainer.karl_consume_metrics()["karl/level/missing_field"] == 8


def test_padding_rows_stay_out_of_metrics_and_online_estimate(base_config, tmp_path, tq):
    trainer = KarlTrainer(make_config(base_config, tmp_path, mastery={"source": "online"}))
    batch = fill_tq(tq, levels=[2, 4], scores=[[1, 1, 1, 0]] * 2, padding=1)
    trainer._compute_advantage(batch, {})
    stats = trainer.karl_consume_metrics()
    assert stats["karl/level_2/count"] == 4 and stats["karl/level_4/count"] == 0
    assert trainer.karl_state.online.entities() == ["E0"]
    assert trainer.karl_state.online.mean("E0") == pytest.approx((1 + 3) / (2 + 4))


# ----------------------------------------------------------------------------- tagging, defaults


def test_unknown_entity_gets_default_level_and_is_counted(base_config, tmp_path, tq, tokenizer):
    config = make_config(base_config, tmp_path, mastery={"source": "online"})
    config.karl.reward = {"default_level": "mostly incorrect"}
    trainer = build_trainer(config, tq, tokenizer, entities=["Su-30", "Nowhere-1", "Su-30", "Nowhere-2"])
    trainer.karl_state.table = MasteryTable.from_scores({"Su-30": 0.5})
    levels = [list(trainer._fetch_one_gen_batch()[LEVEL_FIELD]) for _ in range(2)]
    assert levels == [[2, 4], [2, 4]]
    metrics = trainer.karl_consume_metrics()
    assert metrics["karl/level/defaulted"] == 2 and metrics["karl/level/unknown_entities"] == 2
    assert trainer.karl_state.unknown_entities == {"Nowhere-1", "Nowhere-2"}


def test_extra_info_level_is_used_when_the_table_has_no_entry(base_config, tmp_path):
    trainer = KarlTrainer(make_config(base_config, tmp_path, mastery={"source": "online"}))
    trainer.karl_state.table = MasteryTable.from_scores({"A": 0.95})
    gt = {"ground_truth": ground_truth("A")}
    assert trainer.karl_level({"knowledge_level": "mostly correct"}, gt) == (1, "A", True)  # the table wins
    assert trainer.karl_level({"knowledge_level": "mostly correct"}, {"ground_truth": "(1,2),(3,4)"}) == (2, None, True)
    assert trainer.karl_level({}, {"ground_truth": ground_truth("B")}) == (5, "B", False)


# ----------------------------------------------------------------------------- train begin, schedule


def test_train_begin_loads_the_configured_table(base_config, tmp_path, tq, tokenizer):
    table_path = tmp_path / "table.json"
    table_path.write_text(json.dumps({"Su-30": {"knowledge_category": "partially correct"}}))
    trainer = build_trainer(make_config(base_config, tmp_path, mastery={"table_path": str(table_path)}), tq, tokenizer)
    trainer.on_train_begin()
    assert trainer.karl_state.table.level_of("Su-30") == 3
    assert trainer.karl_state.history[0].source == "table_file"
    assert trainer.karl_schedule.describe() == "off"  # no probe set: nothing to refresh with


@pytest.mark.parametrize(("mastery", "expected"), [
    ({"refresh_every_epochs": 1}, [4, 7, 10]),
    ({"refresh_every_epochs": 2}, [7]),
    ({"refresh_every_steps": 2}, [3, 5, 7, 9, 11]),
    ({"refresh_every_epochs": 0}, []),
])
def test_refresh_schedule(base_config, tmp_path, tq, tokenizer, probe_set, mastery, expected):
    path, image_entity = probe_set
    config = make_config(base_config, tmp_path, mastery={"probe_data": path, **mastery})
    trainer = build_trainer(config, tq, tokenizer, backend=FakeProbeBackend(image_entity, known=set()))
    trainer.steps_per_epoch = 3
    trainer.global_steps = 1
    trainer.on_train_begin()
    for step in range(1, 13):
        trainer.global_steps = step
        trainer.on_step_begin()
    assert [r.step for r in trainer.karl_state.history if r.trigger != "train_begin"] == expected


# ----------------------------------------------------------------------------- failures


@pytest.fixture()
def probed_trainer(base_config, tmp_path, tq, tokenizer, probe_set):
    path, image_entity = probe_set
    backend = FakeProbeBackend(image_entity, known={"Su-30"})
    config = make_config(base_config, tmp_path, mastery={"probe_data": path, "probe_timeout_s": 0.5})
    trainer = build_trainer(config, tq, tokenizer, backend=backend)
    trainer.global_steps = 1
    trainer.on_train_begin()
    trainer.karl_consume_metrics()
    return trainer, backend


def assert_failed_refresh(trainer, caplog, error):
    before = trainer.karl_state.table.to_json()
    trainer.global_steps = 3
    with caplog.at_level(logging.WARNING, logger=karl_trainer.__name__):
        record = trainer.karl_refresh("epoch")
    assert record.status == "failed" and error in record.error
    assert trainer.karl_state.table.to_json() == before  # the previous table, untouched
    assert trainer.karl_state.history[-1] is record
    metrics = trainer.karl_consume_metrics()
    assert metrics["karl/refresh/failed"] == 1.0 and metrics["karl/refresh/failures_total"] == 1.0
    assert "training goes on with the previous table" in caplog.text


def test_refresh_exception_keeps_the_previous_table(probed_trainer, caplog):
    trainer, backend = probed_trainer
    backend.option_logprobs = lambda requests, options: (_ for _ in ()).throw(ConnectionError("worker died"))
    assert_failed_refresh(trainer, caplog, "ConnectionError: worker died")


def test_refresh_timeout_cancels_and_keeps_the_previous_table(probed_trainer, caplog):
    trainer, backend = probed_trainer
    backend.fault = "hang"
    assert_failed_refresh(trainer, caplog, "ProbeTimeout")
    assert backend.cancelled.is_set()


def test_refresh_with_short_answers_keeps_the_previous_table(probed_trainer, caplog, monkeypatch):
    trainer, _ = probed_trainer
    original = trainer.karl_mastery.call_probe

    def short(questions, backend, mode, epoch):  # the servers answered only part of the questions
        result = original(questions, backend, mode, epoch)
        kept = [q for q in questions if q.entity != "MiG-29"]
        return ProbeResult(table=MasteryTable({e: v for e, v in result.table.entries.items() if e != "MiG-29"}),
                           per_entity_accuracy={}, per_entity_expected_accuracy=None, num_questions=len(kept),
                           num_unparseable=0, wall_time_s=0.0, decisions={q.question_id: "A" for q in kept},
                           mode=mode)

    monkeypatch.setattr(trainer.karl_mastery, "call_probe", short)
    assert_failed_refresh(trainer, caplog, "IncompleteProbe")


def test_backend_returning_too_few_rows_is_a_failed_refresh(probed_trainer, caplog):
    trainer, backend = probed_trainer
    answer = backend.option_logprobs
    backend.option_logprobs = lambda requests, options: answer(requests, options)[:-1]
    assert_failed_refresh(trainer, caplog, "ProbeError")


def test_failed_probe_at_train_begin_raises(base_config, tmp_path, tq, tokenizer, probe_set):
    path, image_entity = probe_set
    backend = FakeProbeBackend(image_entity, known=set())
    backend.option_logprobs = lambda requests, options: (_ for _ in ()).throw(ConnectionError("no servers"))
    trainer = build_trainer(make_config(base_config, tmp_path, mastery={"probe_data": path}), tq, tokenizer,
                            backend=backend)
    with pytest.raises(RuntimeError, match="probe at train begin failed"):
        trainer.on_train_begin()


# ----------------------------------------------------------------------------- online / blend


def test_online_refresh_uses_the_rollouts(base_config, tmp_path, tq):
    mastery = {"source": "online", "online_min_evidence": 4, "online_decay": 0.5, "refresh_every_steps": 1}
    trainer = KarlTrainer(make_config(base_config, tmp_path, mastery=mastery))
    trainer.steps_per_epoch, trainer.global_steps = 2, 1
    trainer.on_train_begin()
    assert trainer.karl_state.history[0].source == "none" and len(trainer.karl_state.table) == 0
    batch = fill_tq(tq, levels=[5, 5], scores=[[1, 1, 1, 1], [1, 0, 0, 0]])
    trainer._compute_advantage(batch, {})
    trainer.global_steps = 2
    trainer.on_step_begin()
    table = trainer.karl_state.table
    assert table.get("E0").score == pytest.approx(5 / 6) and table.level_of("E0") == 1
    assert table.get("E1").score == pytest.approx(2 / 6) and table.level_of("E1") == 3
    assert trainer.karl_state.online.evidence("E0") == pytest.approx(2.0)  # decayed after the refresh


def test_blend_refresh_mixes_probe_and_rollouts(base_config, tmp_path, tq, tokenizer, probe_set):
    path, image_entity = probe_set
    mastery = {"probe_data": path, "source": "blend", "online_weight": 0.5, "online_min_evidence": 4}
    trainer = build_trainer(make_config(base_config, tmp_path, mastery=mastery), tq, tokenizer,
                            backend=FakeProbeBackend(image_entity, known={"Su-30"}))
    trainer.global_steps = 1
    trainer.on_train_begin()
    trainer.karl_state.online.observe(["Su-30"] * 8, [0.0] * 8)  # grounding fails despite recognition
    trainer.global_steps = 3
    trainer.karl_refresh("epoch")
    entry = trainer.karl_state.table.get("Su-30")
    assert entry.score == pytest.approx(0.5 * 1.0 + 0.5 * 0.1) and entry.level == 2
    assert trainer.karl_state.table.level_of("F-16") == 5


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_restores_table_and_history(base_config, tmp_path, tq, tokenizer, probe_set):
    path, image_entity = probe_set
    mastery = {"probe_data": path, "source": "blend", "online_min_evidence": 2}
    config = make_config(base_config, tmp_path, mastery=mastery)
    backend = FakeProbeBackend(image_entity, known={"Su-30"})
    trainer = build_trainer(config, tq, tokenizer, backend=backend)
    trainer.global_steps = 1
    trainer.on_train_begin()
    trainer.karl_state.online.observe(["F-16", "F-16", "J-10"], [1.0, 1.0, 0.0])
    trainer.global_steps = 3
    backend.known.add("MiG-29")
    trainer.karl_refresh("epoch")
    trainer.karl_state.unknown_entities.add("Tu-160")
    trainer.global_steps = 4
    trainer._save_checkpoint()
    saved = trainer.karl_state.to_json()
    folder = tmp_path / "ckpt" / "global_step_4"
    assert (folder / STATE_FILE).is_file() and (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").is_file()
    json.loads((folder / STATE_FILE).read_text())  # plain JSON

    # a new trainer object resumes: same table, history and posterior; no probe at train begin
    fresh_backend = FakeProbeBackend(image_entity, known=set())
    resumed = build_trainer(copy.deepcopy(config), tq, tokenizer, backend=fresh_backend)
    assert resumed.global_steps == 4
    assert resumed.actor_rollout_wg.loaded == str(folder / "actor")
    assert resumed.karl_state.to_json() == saved
    resumed.on_train_begin()
    assert fresh_backend.calls == 0 and resumed.karl_state.to_json() == saved
    assert MasteryState.load(folder / STATE_FILE).table.level_of("MiG-29") == 1


def test_resume_from_a_checkpoint_without_mastery_state_sets_up_afresh(base_config, tmp_path, tq, tokenizer, caplog):
    table_path = tmp_path / "table.json"
    table_path.write_text(json.dumps({"Su-30": {"knowledge_category": "mostly correct"}}))
    config = make_config(base_config, tmp_path, mastery={"table_path": str(table_path)})
    trainer = build_trainer(config, tq, tokenizer)
    trainer.global_steps = 2
    PPOTrainer._save_checkpoint(trainer)  # a checkpoint written by another trainer: no mastery state
    with caplog.at_level(logging.WARNING, logger=karl_trainer.__name__):
        resumed = build_trainer(copy.deepcopy(config), tq, tokenizer)
    assert resumed.global_steps == 2 and not resumed.karl_state.initialized
    assert STATE_FILE in caplog.text
    resumed.on_train_begin()
    assert resumed.karl_state.table.level_of("Su-30") == 2


# ----------------------------------------------------------------------------- refresh budget


def test_a_refresh_asks_up_to_refresh_questions_per_entity_drawn_afresh(base_config, tmp_path, tq, tokenizer,
                                                                        probe_set):
    path, image_entity = probe_set
    config = make_config(base_config, tmp_path, mastery={"probe_data": path, "probe_images_per_entity": 2,
                                                         "refresh_questions_per_entity": 1})
    trainer = build_trainer(config, tq, tokenizer, backend=FakeProbeBackend(image_entity, known=set()))
    first = trainer.karl_mastery.refresh_questions(0)
    assert sorted(q.entity for q in first) == sorted(PROBED)  # one question of each entity
    assert [q.question_id for q in trainer.karl_mastery.refresh_questions(0)] == [q.question_id for q in first]
    subsets = {tuple(sorted(q.question_id for q in trainer.karl_mastery.refresh_questions(i))) for i in range(12)}
    assert len(subsets) > 1  # another refresh draws other images
    trainer.on_train_begin()
    assert trainer.karl_state.history[-1].num_questions == len(PROBED)


def test_the_refresh_budget_is_reported_and_warned_above_its_share(base_config, tmp_path, tq, tokenizer, probe_set,
                                                                  caplog):
    path, image_entity = probe_set
    config = make_config(base_config, tmp_path, mastery={"probe_data": path, "probe_images_per_entity": 2,
                                                         "max_refresh_share": 0.05})
    trainer = build_trainer(config, tq, tokenizer, backend=FakeProbeBackend(image_entity, known=set()))
    trainer.on_train_begin()
    assert trainer.karl_mastery.seconds_per_question is not None
    trainer.karl_mastery.seconds_per_question = 1.0  # 8 questions: an 8 s refresh
    with caplog.at_level(logging.INFO, logger="karl_verl.integration.trainer"):
        trainer.karl_mastery.report_budget(step_seconds=1.0)  # an epoch of steps_per_epoch 1 s steps
    epoch_s = trainer.steps_per_epoch * 1.0
    share = trainer.karl_mastery.pending_metrics["karl/refresh/estimated_epoch_share"]
    assert share == pytest.approx(8.0 / (8.0 + epoch_s))
    assert trainer.karl_mastery.pending_metrics["karl/refresh/estimated_time_s"] == pytest.approx(8.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "max_refresh_share" in r.getMessage()]
    assert len(warnings) == 1 and "8 questions per refresh" in warnings[0].getMessage()
    caplog.clear()
    trainer.karl_mastery.seconds_per_question = 1e-6
    with caplog.at_level(logging.INFO, logger="karl_verl.integration.trainer"):
        trainer.karl_mastery.report_budget(step_seconds=1.0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("refresh budget" in r.getMessage() for r in caplog.records)


def test_inject_on_policy_group_stats_and_metrics_through_the_trainer(base_config, tmp_path, tq, monkeypatch):
    """karl.inject: injected rows (karl_injected=1, session 0) are normalised by their group's sampled rows only,
    and the step's karl/inject/* metrics count them (their old log-probs are 0 here: probability 1)."""
    from karl_verl.integration import inject as inject_driver
    from karl_verl.integration.inject_loss import INJECTED_FIELD

    references = tmp_path / "refs.jsonl"
    references.write_text('{"key": 0, "response": "r"}\n')
    config = make_config(base_config, tmp_path, mastery={"source": "online"})
    config.karl["inject"] = {"enable": True, "responses_path": str(references), "on_policy_group_stats": True}
    config.actor_rollout_ref.rollout.agent.default_agent_loop = "karl_inject_agent"
    monkeypatch.setattr(inject_driver, "tq", tq)
    trainer = KarlTrainer(config)
    # Group 0: injected 2.0, sampled 0, 1, 2 (mean 1, std 1). Group 1: injected 1.0, sampled 0.5, 0.5, 1.5.
    batch = fill_tq(tq, levels=[5, 4], scores=[[2.0, 0.0, 1.0, 2.0], [1.0, 0.5, 0.5, 1.5]])
    flags = [int(key.split("_")[1] == "0") for key in batch.keys]
    tq.kv_batch_put(batch.keys, "train", fields=TensorDict({INJECTED_FIELD: torch.tensor(flags)}, batch_size=[8]))
    trainer._compute_advantage(batch, {})
    advantages = read_advantages(tq, batch)[0][:, 0]
    assert advantages[:4].tolist() == pytest.approx([1.0, -1.0, 0.0, 1.0], abs=1e-5)
    std = float(np.std([0.5, 0.5, 1.5], ddof=1))
    assert advantages[4:].tolist() == pytest.approx([(v - 5 / 6) / std for v in (1.0, 0.5, 0.5, 1.5)], abs=1e-5)
    metrics = trainer.karl_consume_metrics()
    assert metrics["karl/inject/rows"] == 2 and metrics["karl/inject/level_5/rows"] == 1
    assert metrics["karl/inject/level_4/reward_mean"] == pytest.approx(1.0)
    assert metrics["karl/inject/prob_mean"] == pytest.approx(1.0)

    # Without on_policy_group_stats the injected rows count in the group statistics (plain GRPO).
    config.karl["inject"]["on_policy_group_stats"] = False
    plain = KarlTrainer(config)
    plain._compute_advantage(batch, {})
    expected, _ = compute_karl_grpo_advantage(torch.tensor([[2.0, 0.0, 1.0, 2.0, 1.0, 0.5, 0.5, 1.5]]).T,
                                              torch.ones(8, 1), np.array(["a"] * 4 + ["b"] * 4, dtype=object))
    assert torch.allclose(read_advantages(tq, batch)[0][:, 0], expected[:, 0])
