"""Dynamic sampling's bookkeeping (karl_verl/integration/dynamic_sampling.py), without Ray.

The replay buffer is verl's own ``ReplayBuffer`` built with the arguments verl's trainer passes in
sync mode; only TransferQueue reads are left out (the real path is tests/dryrun/test_ranks.py).
"""

from collections import Counter

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from karl_verl.config import RewardConfig
from karl_verl.integration.dynamic_sampling import (
    KarlReplayBuffer,
    constant_groups,
    filter_metric,
    filter_metrics,
    row_metric_values,
)
from karl_verl.reward import score_response

GT = "<|object_ref_start|>Su-30<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"


def verl_buffer(refills: list[int], train_batch_size: int = 4) -> ReplayBuffer:
    def refill(num_prompts: int) -> int:
        refills.append(num_prompts)
        return num_prompts

    return ReplayBuffer(trainer_mode="sync", trainer_config=OmegaConf.create({}), max_off_policy_threshold=None,
                        max_off_policy_strategy="drop", sampler_kwargs=OmegaConf.create({}), refill_fn=refill,
                        filter_groups_metric="success", sync_refill_failed_groups=False,
                        train_batch_size=train_batch_size, gen_batch_size=1, max_inflight_gen_batches=2)


def test_reward_lets_an_all_failure_group_through_where_success_does_not():
    """The format term differs between failed rollouts, so a group that fails everywhere has a
    non-constant reward: the ``reward`` metric keeps it (zero advantage), ``success`` drops it."""
    config = RewardConfig()
    responses = ["<think>a</think><answer>(0,0),(10,10)</answer>",  # format 1.0, IoU 0
                 "<answer>(0,0),(10,10)</answer>",  # box only: format 0.5
                 "no answer at all",  # format 0
                 "<think>a</think><answer>(100,100),(300,160)</answer>"]  # IoU 0.3 < tau
    infos = [score_response(text, GT, 3, config) for text in responses]
    assert all(info["success"] == 0.0 for info in infos)
    keys = [f"g1_{i}_0" for i in range(4)]
    rewards = [info["score"] for info in infos]
    assert len(set(rewards)) > 1
    assert constant_groups(keys, row_metric_values("reward", infos, rewards), [True] * 4) == 0
    assert constant_groups(keys, row_metric_values("success", infos, rewards), [True] * 4) == 1


def test_constant_groups_counts_groups_with_one_value_leaving_out_padding_and_singletons():
    keys = ["a_0_0", "a_1_0", "b_0_0", "b_1_0", "c_0_0", "d_0_0", "d_1_0"]
    values = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert constant_groups(keys, values, [True] * 7) == 2  # a (all 1), d (all 0); c has one row
    assert constant_groups(keys, values, [True, True, True, False, True, True, True]) == 2  # b now one row
    assert constant_groups(keys, [None] * 7, [True] * 7) == 0


def test_filter_metrics_split_dropped_groups_by_level_and_value():
    dropped = Counter({(3, 0.0): 2, (3, 1.0): 1, (5, 0.0): 4})
    out = filter_metrics("success", dropped, Counter({3: 5, 5: 2}), exhausted=1, trained_constant=2)
    assert out["karl/filter/level_3/dropped_groups"] == 3
    assert out["karl/filter/level_3/dropped_all_success"] == 1 and out["karl/filter/level_3/dropped_all_failure"] == 2
    assert out["karl/filter/level_5/dropped_all_failure"] == 4 and out["karl/filter/level_1/dropped_groups"] == 0
    assert out["karl/filter/dropped_groups"] == 7 and out["karl/filter/refilled_prompts"] == 7
    assert out["karl/filter/budget_exhausted"] == 1 and out["karl/filter/trained_constant_groups"] == 2
    assert "karl/filter/level_3/dropped_all_success" not in filter_metrics("reward", dropped, Counter(), 0, 0)


def test_filter_metric_reads_verls_keys():
    assert filter_metric(OmegaConf.create({"algorithm": {}})) is None
    off = {"algorithm": {"filter_groups": {"enable": False, "metric": "success"}}}
    assert filter_metric(OmegaConf.create(off)) is None
    on = {"algorithm": {"filter_groups": {"enable": True, "metric": "success"}}}
    assert filter_metric(OmegaConf.create(on)) == "success"


def test_specialise_keeps_verls_settings_and_counts_refills():
    refills: list[int] = []
    buffer = KarlReplayBuffer.specialise(verl_buffer(refills), max_gen_batches=3)
    assert isinstance(buffer, ReplayBuffer) and buffer.filter_groups_metric == "success"
    assert buffer.train_batch_size == 4 and buffer.max_inflight_gen_batches == 2
    buffer.refill_fn(5)
    assert refills == [5] and buffer._karl_refilled == 5
    assert buffer._karl_budget_left()  # 4 + 5 < 3 * 4
    buffer.refill_fn(3)
    assert not buffer._karl_budget_left()  # 4 + 8 = 12 prompts: three batches
    with pytest.raises(TypeError):
        KarlReplayBuffer.specialise(buffer, max_gen_batches=3)  # already specialised


def test_no_budget_means_verls_endless_refill():
    buffer = KarlReplayBuffer.specialise(verl_buffer([]), max_gen_batches=0)
    buffer.refill_fn(10_000)
    assert buffer._karl_budget_left()


def test_after_the_budget_groups_with_a_signal_are_selected_first_in_verls_order():
    buffer = KarlReplayBuffer.specialise(verl_buffer([]), max_gen_batches=2)
    steps = {"u1": 1, "u2": 1, "u3": 2, "u4": 2, "u5": 3}
    buffer.prompt_global_steps["train"].update(steps)
    # u1 and u4 are constant (the filter's classification value), the others carry a signal.
    buffer._dapo_classification_cache["train"].update({"u1": 0.0, "u2": None, "u3": None, "u4": 1.0, "u5": None})
    selected, _, _ = buffer._select_prompt_uids("train", set(steps), 3)
    assert selected == sorted(selected, key=steps.get)  # while filtering: verl's order, oldest first
    buffer._karl_filtering = False
    selected, _, _ = buffer._select_prompt_uids("train", set(steps), 4)
    assert selected[:3] == ["u2", "u3", "u5"] and selected[3] in ("u1", "u4")


def _trainer_for_buffer(sampler: dict | None = None):
    from karl_verl.integration.features import DynamicSampling
    from karl_verl.integration.trainer import KarlTrainer

    trainer = KarlTrainer.__new__(KarlTrainer)
    trainer.trainer_mode = "sync"
    trainer.config = OmegaConf.create({
        "trainer": {"v1": {"sampler": {"max_off_policy_threshold": None, "max_off_policy_strategy": "drop",
                                       "sampler_kwargs": {}, **(sampler or {})}}},
        "algorithm": {"filter_groups": {"enable": True, "metric": "success", "max_num_gen_batches": 3}},
        "reward": {"reward_model": {"enable": False}},
        "data": {"train_batch_size": 4},
    })
    trainer._add_prompts_to_generate = lambda num_prompts: num_prompts
    feature = DynamicSampling(trainer)
    feature.observe_dropped = lambda partition_id, keys: None
    trainer.karl_features = [feature]
    return trainer


def test_verls_budget_ignored_warning_is_replaced_by_ours_where_the_budget_is_honoured(caplog):
    """verl warns that max_num_gen_batches is ignored; under the karl trainer it is honoured: one line
    of ours says so, verl's does not appear."""
    import logging

    with caplog.at_level(logging.INFO):
        buffer = _trainer_for_buffer()._build_replay_buffer()
    assert isinstance(buffer, KarlReplayBuffer) and buffer.karl_max_gen_batches == 3
    messages = [r.getMessage() for r in caplog.records if "max_num_gen_batches" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("karl: algorithm.filter_groups.max_num_gen_batches=3 is "
                                                         "honoured")
